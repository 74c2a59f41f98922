"""Peer check through Ray: LLM.generate at tensor_parallel_size 1 and 2 against Hugging
Face transformers on the same tiny random checkpoints, for every supported family —
token-id prompts, the model's own embeddings of them, and random embeddings, mixed in
one call. Greedy tokens equal; float32 log-probabilities close."""

from __future__ import annotations

import pytest
import torch

from cluster import LLM, SamplingParams
from tests.hf_reference import embed_tokens, hf_greedy, load_hf_model

FAMILIES = ["llama", "llama-tied", "mistral", "qwen2", "qwen3"]
MAX_TOKENS = 8
LOGPROBS = 5


@pytest.fixture(scope="module", params=[(f, tp) for f in FAMILIES for tp in (1, 2)],
                ids=lambda p: f"{p[0]}-tp{p[1]}")
def engine(request, ray_cluster, tiny_checkpoints):
    family, tp = request.param
    path = tiny_checkpoints(family)
    llm = LLM(str(path), tensor_parallel_size=tp, enable_prompt_embeds=True, max_model_len=128,
              kv_cache_memory_bytes=16 << 20)
    yield llm, load_hf_model(path)
    llm.shutdown()


def _prompts(hf_model, vocab_size: int):
    gen = torch.Generator().manual_seed(7)
    short = torch.randint(3, vocab_size, (5,), generator=gen).tolist()
    long = torch.randint(3, vocab_size, (37,), generator=gen).tolist()  # crosses blocks
    hidden = hf_model.config.hidden_size
    random_embeds = torch.randn(11, hidden, generator=gen)
    return short, long, random_embeds


def _assert_matches(output, reference, where: str):
    sample = output.outputs[0]
    assert sample.token_ids == reference.token_ids, where
    assert len(sample.logprobs) == MAX_TOKENS
    for step, (top, ref) in enumerate(zip(sample.logprobs, reference.logprobs)):
        ref_top = torch.topk(ref, LOGPROBS)
        ours = sorted(((lp.rank, tid, lp.logprob) for tid, lp in top.items() if lp.rank), key=lambda x: x[0])
        assert [tid for _, tid, _ in ours] == ref_top.indices.tolist(), f"{where} step {step}"
        torch.testing.assert_close(
            torch.tensor([lp for _, _, lp in ours]), ref_top.values, atol=2e-4, rtol=0,
            msg=lambda m: f"{where} step {step}: {m}",
        )


def test_greedy_tokens_and_logprobs_match_hf(engine):
    llm, hf_model = engine
    short, long, random_embeds = _prompts(hf_model, hf_model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=LOGPROBS, ignore_eos=True)
    prompts = [
        {"prompt_token_ids": short},
        {"prompt_embeds": embed_tokens(hf_model, long)},  # the model's own embeddings
        {"prompt_token_ids": long},
        {"prompt_embeds": random_embeds[None]},  # leading batch dim of 1
        {"prompt_embeds": embed_tokens(hf_model, short).to(torch.bfloat16)},  # cast to float32
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.num_prompt_tokens for o in outputs] == [5, 37, 37, 11, 5]
    assert outputs[0].prompt_token_ids == short and outputs[1].prompt_token_ids is None
    _assert_matches(outputs[0], hf_greedy(hf_model, MAX_TOKENS, input_ids=short), "token ids")
    _assert_matches(outputs[2], hf_greedy(hf_model, MAX_TOKENS, input_ids=long), "long token ids")
    _assert_matches(outputs[1], hf_greedy(hf_model, MAX_TOKENS, input_ids=long), "own embeddings")
    _assert_matches(
        outputs[3], hf_greedy(hf_model, MAX_TOKENS, inputs_embeds=random_embeds), "random embeddings"
    )
    rounded = embed_tokens(hf_model, short).to(torch.bfloat16).float()
    _assert_matches(outputs[4], hf_greedy(hf_model, MAX_TOKENS, inputs_embeds=rounded), "bf16 embeddings")
    assert outputs[1].outputs[0].token_ids == outputs[2].outputs[0].token_ids
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)


def test_steps_of_embedding_rows_only_match_hf(engine):
    """A step whose rows are all prompt embeddings skips the token lookup (and its
    all-reduce at TP 2); embeddings-only calls, of one prompt and of two."""
    llm, hf_model = engine
    short, long, random_embeds = _prompts(hf_model, hf_model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=LOGPROBS, ignore_eos=True)
    alone = llm.generate({"prompt_embeds": random_embeds}, params, use_tqdm=False)[0]
    together = llm.generate([{"prompt_embeds": embed_tokens(hf_model, long)}, {"prompt_embeds": random_embeds}],
                            params, use_tqdm=False)
    from_random = hf_greedy(hf_model, MAX_TOKENS, inputs_embeds=random_embeds)
    _assert_matches(alone, from_random, "one request's embeddings")
    _assert_matches(together[0], hf_greedy(hf_model, MAX_TOKENS, input_ids=long), "own embeddings, beside random")
    _assert_matches(together[1], from_random, "random embeddings, beside own")


@pytest.mark.parametrize("tp", [1, 2], ids=lambda tp: f"tp{tp}")
def test_prompts_longer_than_a_step_are_prefilled_in_chunks_and_match_hf(ray_cluster, tiny_checkpoints, tp):
    """A 16-token step budget: the 37-row prompts (token ids, and the model's own
    embeddings of them) are prefilled over three steps, beside the short prompt's decodes
    (on CUDA, the steps holding one request's chunk alone replay the prefill graphs)."""
    path = tiny_checkpoints("llama")
    hf_model = load_hf_model(path)
    short, long, _ = _prompts(hf_model, hf_model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=LOGPROBS, ignore_eos=True)
    with LLM(str(path), tensor_parallel_size=tp, enable_prompt_embeds=True, max_model_len=128,
             max_num_batched_tokens=16, kv_cache_memory_bytes=16 << 20) as llm:
        assert llm.config.max_num_batched_tokens == 16
        outputs = llm.generate([{"prompt_token_ids": short}, {"prompt_token_ids": long},
                                {"prompt_embeds": embed_tokens(hf_model, long)}], params, use_tqdm=False)
    _assert_matches(outputs[0], hf_greedy(hf_model, MAX_TOKENS, input_ids=short), "short, beside the chunks")
    from_long = hf_greedy(hf_model, MAX_TOKENS, input_ids=long)
    _assert_matches(outputs[1], from_long, "token ids in chunks")
    _assert_matches(outputs[2], from_long, "embeddings in chunks")
