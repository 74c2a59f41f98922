"""prompt_logprobs (vLLM's SamplingParams field) at tensor_parallel_size 2 with prompts
prefilled in chunks: each prompt token's log-probability, rank and top-k against Hugging
Face's log-softmax of the same prompt, and what it does not change (the generated tokens,
requests beside it). The leader's copy kept across a recompute is checked on Request."""

from __future__ import annotations

import pytest
import torch

from cluster import LLM, SamplingParams
from tests.cluster.peer_checks import random_ids
from tests.hf_reference import load_hf_model
from workers.messages import PromptLogprobs
from workers.request import Request

CHUNK = 16  # max_num_batched_tokens: a 40-token prompt is prefilled in three steps


@pytest.fixture(scope="module")
def llm(ray_cluster):
    with LLM(tensor_parallel_size=2, enable_prompt_embeds=True, max_model_len=128, max_num_batched_tokens=CHUNK,
             kv_cache_memory_bytes=16 << 20) as llm:
        yield llm


@pytest.fixture(scope="module")
def hf_model(llm):
    return load_hf_model(llm.config.model)


@torch.inference_mode()
def _hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row p is the distribution of the token after position p."""
    return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_prompt_logprobs_match_hf_across_chunks(llm, hf_model):
    vocab = llm.config.model_config.vocab_size
    prompts = [random_ids(1, 40, vocab), random_ids(2, 7, vocab)]
    scored = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=5, n=2)
    plain = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    # A request without prompt logprobs shares the steps: its tokens and theirs are unchanged.
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts] + [{"prompt_token_ids": prompts[0]}],
                           [scored, scored, plain], use_tqdm=False)
    assert outputs[2].prompt_logprobs is None
    for ids, output in zip(prompts, outputs):
        reference = _hf_logprobs(hf_model, ids)
        entries = output.prompt_logprobs
        assert len(entries) == len(ids) and entries[0] is None
        for position in range(1, len(ids)):
            row, token, entry = reference[position - 1], ids[position], entries[position]
            assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
            assert entry[token].rank == int((row > row[token]).sum()) + 1
            assert entry[token].decoded_token == llm.get_tokenizer().decode([token])
            top_ids = row.topk(5).indices.tolist()
            ranked = sorted((e for e in entry.items() if e[1].rank <= 5), key=lambda e: e[1].rank)
            assert [tid for tid, _ in ranked] == top_ids, position
            assert set(entry) <= set(top_ids) | {token}
        assert len(output.outputs) == 2
    # Greedy on the same prompt: scoring it changed none of its tokens.
    assert [o.token_ids for o in outputs[0].outputs] == [outputs[2].outputs[0].token_ids] * 2


def test_prompt_logprobs_zero_give_each_token_its_own_and_one_token_has_none(llm):
    vocab = llm.config.model_config.vocab_size
    ids = random_ids(3, 9, vocab)
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0)
    long, short = llm.generate([{"prompt_token_ids": ids}, {"prompt_token_ids": ids[:1]}], params, use_tqdm=False)
    assert [list(e) for e in long.prompt_logprobs[1:]] == [[t] for t in ids[1:]]
    assert short.prompt_logprobs == [None]
    text = llm.generate(["The quick brown fox"], params, use_tqdm=False)[0]
    assert len(text.prompt_logprobs) == len(text.prompt_token_ids)


def test_prompt_logprobs_of_an_embeddings_prompt_raise_and_the_llm_keeps_working(llm):
    embeds = torch.randn(5, llm.config.model_config.hidden_size)
    with pytest.raises(ValueError, match="prompt_logprobs needs a prompt of text or token ids"):
        llm.generate([{"prompt_embeds": embeds}], SamplingParams(max_tokens=2, prompt_logprobs=1), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs must be between 0 and 20"):
        SamplingParams(prompt_logprobs=21)
    (output,) = llm.generate([{"prompt_embeds": embeds}], SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 2 and output.prompt_logprobs is None


def test_the_leader_keeps_the_first_copy_of_positions_a_recompute_repeats():
    request = Request("r", [1, 2, 3, 4, 5], 5, SamplingParams(prompt_logprobs=1), (0,), 64)
    request.add_prompt_logprobs(PromptLogprobs(0, (-1.0, -2.0), (1, 2), (((7, -0.5),), ((8, -0.6),))))
    # Preempted before its first sample, then prefilled again from position 0.
    request.add_prompt_logprobs(PromptLogprobs(0, (-9.0, -9.0, -3.0), (9, 9, 3), ((), (), ((9, -0.7),))))
    request.add_prompt_logprobs(PromptLogprobs(3, (-4.0,), (4,), (((6, -0.1),),)))
    sent = request.take_prompt_logprobs()
    assert sent == PromptLogprobs(0, (-1.0, -2.0, -3.0, -4.0), (1, 2, 3, 4),
                                  (((7, -0.5),), ((8, -0.6),), ((9, -0.7),), ((6, -0.1),)))
    assert request.take_prompt_logprobs() is None  # once, with the first token
    with pytest.raises(RuntimeError, match="came before"):
        request.add_prompt_logprobs(PromptLogprobs(9, (-1.0,), (1,), ((),)))
