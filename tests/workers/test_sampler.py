"""Sampler: greedy, top-k/top-p/min-p, seeded reproducibility, temperature statistics, raw
logprobs, min_tokens masking and each penalty formula on hand-made logits."""

import math

import pytest
import torch

from workers.request import Request
from workers.sampler import Sampler, apply_min_p, apply_penalties
from workers.sampling_params import SamplingParams

EOS = 0


def make_request(req_id="r", *, prompt_token_ids=(5, 6), output_token_ids=(), **params):
    prompt = list(prompt_token_ids) if prompt_token_ids is not None else None
    request = Request(req_id, prompt, 3 if prompt is None else len(prompt),
                      SamplingParams(**params), (EOS,), 1024)
    request.output_token_ids = list(output_token_ids)
    return request


def random_logits(num_rows, vocab_size, seed=0):
    return torch.randn(num_rows, vocab_size, generator=torch.Generator().manual_seed(seed)) * 3


def token_ids(results):
    return [r.token_id for r in results]


def test_greedy_is_argmax_with_first_index_on_ties():
    logits = random_logits(6, 50)
    logits[5] = torch.tensor([1.0, 3.0, 3.0] + [0.0] * 47)
    results = Sampler(seed=1)(logits, [make_request(temperature=0.0) for _ in range(6)])
    assert token_ids(results) == logits.argmax(dim=-1).tolist()
    assert token_ids(results)[5] == 1
    assert all(r.logprobs is None for r in results)


@pytest.mark.parametrize("params", [{"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "top_p": 0.5}])
def test_top_k_one_and_tiny_top_p_are_greedy(params):
    logits = random_logits(8, 100, seed=3)
    sampler = Sampler(seed=0)
    for _ in range(3):
        results = sampler(logits, [make_request(temperature=1.5, **params) for _ in range(8)])
        assert token_ids(results) == logits.argmax(dim=-1).tolist()


def test_top_k_past_the_vocabulary_keeps_every_token():
    """vLLM's reading of a top_k at or past the vocabulary; 2**63 would not fit int64."""
    logits = random_logits(2, 100, seed=4)
    for top_k in (100, 10**6, 2**63, 2**70):
        seeded = [make_request(f"r{i}", temperature=1.0, seed=i, top_k=top_k) for i in range(2)]
        unbounded = [make_request(f"r{i}", temperature=1.0, seed=i) for i in range(2)]
        assert token_ids(Sampler(seed=0)(logits, seeded)) == token_ids(Sampler(seed=0)(logits, unbounded))


def test_a_tiny_temperature_samples_near_greedy_not_token_zero():
    """Below ~1e-38 a temperature is 0 in float32; it samples at vLLM's floor instead."""
    logits = random_logits(8, 100, seed=5)
    results = Sampler(seed=0)(logits, [make_request(f"r{i}", temperature=1e-45, seed=i) for i in range(8)])
    assert token_ids(results) == logits.argmax(dim=-1).tolist()


def draw_sequence(seed, batch_position, batch_size, num_steps=6):
    """Tokens of a seeded request sampled `num_steps` times among unseeded neighbours."""
    sampler = Sampler(seed=batch_size)  # other rows use a different shared stream per case
    request = make_request("seeded", seed=seed, temperature=1.0)
    tokens = []
    for step in range(num_steps):
        batch = [make_request(f"n{i}", temperature=0.8) for i in range(batch_size - 1)]
        batch.insert(batch_position, request)
        logits = torch.zeros(batch_size, 1000)  # uniform: every draw depends on the noise
        logits[:, step] = 1.0
        tokens.append(token_ids(sampler(logits, batch))[batch_position])
    return tokens


def test_seeded_sampling_is_reproducible_and_batch_independent():
    alone = draw_sequence(seed=42, batch_position=0, batch_size=1)
    assert draw_sequence(seed=42, batch_position=0, batch_size=1) == alone
    assert draw_sequence(seed=42, batch_position=2, batch_size=5) == alone
    assert draw_sequence(seed=42, batch_position=7, batch_size=8) == alone
    assert draw_sequence(seed=43, batch_position=0, batch_size=1) != alone


def empirical_distribution(logits_row, num_draws=20000, **params):
    logits = logits_row.expand(num_draws, -1)
    requests = [make_request(str(i), **params) for i in range(num_draws)]
    tokens = torch.tensor(token_ids(Sampler(seed=0)(logits, requests)))
    return torch.bincount(tokens, minlength=logits.shape[1]).float() / num_draws


def tempered(probs, temperature):
    """softmax(log p / T) = p^(1/T), renormalized."""
    weights = [p ** (1.0 / temperature) for p in probs]
    return [w / sum(weights) for w in weights]


@pytest.mark.parametrize(
    "params,expected",
    [
        ({"temperature": 1.0}, [0.5, 0.3, 0.2]),
        ({"temperature": 2.0}, tempered((0.5, 0.3, 0.2), 2.0)),
        ({"temperature": 0.5}, tempered((0.5, 0.3, 0.2), 0.5)),
        ({"temperature": 1.0, "top_k": 2}, [0.5 / 0.8, 0.3 / 0.8, 0.0]),
        ({"temperature": 1.0, "top_p": 0.7}, [0.5 / 0.8, 0.3 / 0.8, 0.0]),
        ({"temperature": 1.0, "top_p": 0.85}, [0.5, 0.3, 0.2]),
        ({"temperature": 1.0, "min_p": 0.5}, [0.5 / 0.8, 0.3 / 0.8, 0.0]),  # keeps p >= 0.25
        ({"temperature": 1.0, "min_p": 0.7}, [1.0, 0.0, 0.0]),  # keeps p >= 0.35
        # min-p after temperature: at T=2 the probabilities are ~(0.42, 0.32, 0.26), so
        # min_p 0.7 (p >= 0.29) keeps the first two.
        ({"temperature": 2.0, "min_p": 0.7}, [t / sum(tempered((0.5, 0.3, 0.2), 2.0)[:2])
                                              for t in tempered((0.5, 0.3, 0.2), 2.0)[:2]] + [0.0]),
    ],
)
def test_sampled_distribution_matches_temperature_top_k_top_p_min_p(params, expected):
    logits_row = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]]) + 1.7
    observed = empirical_distribution(logits_row, **params)
    assert observed.tolist() == pytest.approx(expected, abs=0.015)


def test_logprobs_come_from_raw_logits_with_top_k_ordering():
    logits = random_logits(3, 40, seed=5)
    requests = [
        make_request("a", logprobs=5, temperature=0.7, repetition_penalty=1.5,
                     output_token_ids=(1, 2), frequency_penalty=1.0),
        make_request("b", logprobs=0, temperature=0.0),
        make_request("c", temperature=0.0),
    ]
    results = Sampler(seed=0)(logits, requests)
    raw = torch.log_softmax(logits, dim=-1)
    first = results[0].logprobs
    assert first.token_logprob == pytest.approx(raw[0, results[0].token_id].item(), abs=1e-6)
    top_values, top_ids = raw[0].topk(5)
    assert [t for t, _ in first.top] == top_ids.tolist()
    assert [v for _, v in first.top] == pytest.approx(top_values.tolist(), abs=1e-6)
    assert [v for _, v in first.top] == sorted((v for _, v in first.top), reverse=True)
    second = results[1].logprobs
    assert second.top == ()
    assert second.token_logprob == pytest.approx(raw[1].max().item(), abs=1e-6)
    assert results[2].logprobs is None


def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    logits = torch.tensor([[9.0, 1.0, 8.0, 7.0]])  # eos (0) then stop token 2 lead
    params = {"temperature": 0.0, "min_tokens": 2, "stop_token_ids": (2,)}
    sampler = Sampler()
    assert token_ids(sampler(logits, [make_request(**params)])) == [3]
    assert token_ids(sampler(logits, [make_request(output_token_ids=(3,), **params)])) == [3]
    assert token_ids(sampler(logits, [make_request(output_token_ids=(3, 3), **params)])) == [0]
    ignoring = make_request(ignore_eos=True, **params)
    assert token_ids(sampler(logits, [ignoring])) == [0]  # eos is not a stop token here
    assert logits.tolist() == [[9.0, 1.0, 8.0, 7.0]]  # the caller's logits are untouched


LOGITS = [2.0, -2.0, 1.0, 0.5, 3.0, -1.0]


@pytest.mark.parametrize(
    "params,prompt_token_ids,expected",
    [
        # seen: prompt {0, 5} + outputs {1, 2}; positive / 2, negative * 2
        ({"repetition_penalty": 2.0}, (0, 5), [1.0, -4.0, 0.5, 0.5, 3.0, -2.0]),
        # embeddings prompt: only outputs {1, 2} are seen
        ({"repetition_penalty": 2.0}, None, [2.0, -4.0, 0.5, 0.5, 3.0, -1.0]),
        # counts: token 1 once, token 2 twice
        ({"frequency_penalty": 0.5}, (0, 5), [2.0, -2.5, 0.0, 0.5, 3.0, -1.0]),
        ({"presence_penalty": 0.3}, (0, 5), [2.0, -2.3, 0.7, 0.5, 3.0, -1.0]),
        ({"presence_penalty": -1.0, "frequency_penalty": 1.0, "repetition_penalty": 0.5}, (3,),
         [2.0, -1.0 - 1.0 + 1.0, 2.0 - 2.0 + 1.0, 1.0, 3.0, -1.0]),
    ],
)
def test_penalty_formulas(params, prompt_token_ids, expected):
    logits = torch.tensor([LOGITS, LOGITS])
    requests = [
        make_request(prompt_token_ids=prompt_token_ids, output_token_ids=(1, 2, 2), **params),
        make_request(prompt_token_ids=prompt_token_ids, output_token_ids=(1, 2, 2)),  # no penalty
    ]
    apply_penalties(logits, requests)
    assert logits[0].tolist() == pytest.approx(expected)
    assert logits[1].tolist() == LOGITS


def test_penalties_skip_a_mixed_prompts_placeholder_ids():
    """Positions 1-2 are embedding rows (their ids placeholders, 0): only ids 3 and 4 of
    the prompt count as seen."""
    request = Request("m", [3, 0, 0, 4], 4, SamplingParams(repetition_penalty=2.0), (EOS,), 1024,
                      embeds_spans=((1, 3),))
    logits = torch.full((1, 6), 2.0)
    apply_penalties(logits, [request])
    assert logits[0].tolist() == [2.0, 2.0, 2.0, 1.0, 1.0, 2.0]


def test_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[1.0, 5.0, 4.0]]).repeat(2, 1)  # prompt ids 5, 6: out of vocab, ignored
    plain = make_request(temperature=0.0, output_token_ids=(1, 1))
    penalized = make_request(temperature=0.0, output_token_ids=(1, 1), frequency_penalty=1.0)
    assert token_ids(Sampler()(logits, [plain, penalized])) == [1, 2]


def test_logits_shape_must_match_requests():
    with pytest.raises(ValueError, match="logits must be"):
        Sampler()(torch.zeros(2, 5), [make_request()])


def test_sample_seeds_stay_64_bit():
    """Sample i of n draws from seed + i, wrapped at 2**63 so the last seed a generator
    takes plus a sample index is still a seed."""
    top = SamplingParams(seed=2**63 - 1, n=3)
    assert [top.for_sample(i).seed for i in range(3)] == [2**63 - 1, -(2**63), -(2**63) + 1]
    assert SamplingParams(seed=5, n=2).for_sample(1).seed == 6
    with pytest.raises(ValueError, match="seed must be a 64-bit integer"):
        SamplingParams(seed=2**64)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_keeps_what_hugging_faces_min_p_warper_keeps(min_p):
    """The peer check: the same tokens survive as with transformers' MinPLogitsWarper on
    the same (temperature-scaled) logits, the top token always among them."""
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = random_logits(8, 300, seed=3)
    logits[2, :3] = logits[2].max() + 1.0  # a tie at the top
    ours = apply_min_p(logits, torch.full((8,), min_p)) > float("-inf")
    if min_p == 0.0:  # the warper refuses 0; 0 means off
        assert ours.all()
        return
    theirs = MinPLogitsWarper(min_p=min_p)(None, logits.clone()) > float("-inf")
    assert torch.equal(ours, theirs)
    assert ours[torch.arange(8), logits.argmax(dim=-1)].all()


def test_min_p_out_of_range_is_refused():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="min_p must be in"):
            SamplingParams(min_p=bad)


def test_logit_bias_steers_greedy_and_sampled_rows_and_leaves_logprobs_raw():
    logits = random_logits(3, 50, seed=9)
    top = logits.argmax(dim=-1).tolist()
    requests = [make_request("g", temperature=0.0, logit_bias={7: 100}),
                make_request("h", temperature=0.0, logit_bias={top[1]: -100}, logprobs=2),
                make_request("s", temperature=1.0, seed=3, logit_bias={11: 100})]
    sampled = Sampler(seed=0).launch(logits, requests)
    assert not sampled.by_argmax  # followers cannot take their own argmax for these rows
    results = sampled.results()
    runner_up = logits[1].clone()
    runner_up[top[1]] = float("-inf")
    assert token_ids(results) == [7, int(runner_up.argmax()), 11]
    assert results[1].logprobs.top[0][0] == top[1]  # logprobs of the raw logits, bias aside
    assert torch.equal(logits, random_logits(3, 50, seed=9))  # the caller's logits untouched


def test_logit_bias_out_of_vocab_is_refused_by_check_vocab():
    SamplingParams(logit_bias={49: 1.0}).check_vocab(50)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 50\): \[50, 70\]"):
        SamplingParams(logit_bias={70: 1.0, 50: -1.0, 3: 0.5}).check_vocab(50)
