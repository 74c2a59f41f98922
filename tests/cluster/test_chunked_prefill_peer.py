"""Peer check of chunked prefill: prompts longer than a step's token budget, prefilled over
several steps beside other requests' decodes, against Hugging Face at tensor_parallel_size
1 and 2.

A module of its own: test_llm_peer's module-scoped engines live until that module ends, and
on a machine with two GPUs its last (TP=2) engine would hold both while this test asked for
its own. That made this test fail on nvidia-h200-x2 in session 8 (placement timeout), where
nvidia-h200-x4 had had GPUs to spare."""

from __future__ import annotations

import pytest

from cluster import LLM, SamplingParams
from tests.cluster.peer_checks import LOGPROBS, MAX_TOKENS, assert_matches_hf, peer_prompts, skip_unless_gpus_hold
from tests.hf_reference import embed_tokens, hf_greedy, load_hf_model


@pytest.mark.parametrize("tp", [1, 2], ids=lambda tp: f"tp{tp}")
def test_prompts_longer_than_a_step_are_prefilled_in_chunks_and_match_hf(ray_cluster, tiny_checkpoints, tp):
    """A 16-token step budget: the 37-row prompts (token ids, and the model's own
    embeddings of them) are prefilled over three steps, beside the short prompt's decodes
    (on CUDA, the steps holding one request's chunk alone replay the prefill graphs)."""
    skip_unless_gpus_hold(tp)
    path = tiny_checkpoints("llama")
    hf_model = load_hf_model(path)
    short, long, _ = peer_prompts(hf_model)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=LOGPROBS, ignore_eos=True)
    with LLM(str(path), tensor_parallel_size=tp, enable_prompt_embeds=True, max_model_len=128,
             max_num_batched_tokens=16, kv_cache_memory_bytes=16 << 20) as llm:
        assert llm.config.max_num_batched_tokens == 16
        outputs = llm.generate([{"prompt_token_ids": short}, {"prompt_token_ids": long},
                                {"prompt_embeds": embed_tokens(hf_model, long)}], params, use_tqdm=False)
    assert_matches_hf(outputs[0], hf_greedy(hf_model, MAX_TOKENS, input_ids=short), "short, beside the chunks")
    from_long = hf_greedy(hf_model, MAX_TOKENS, input_ids=long)
    assert_matches_hf(outputs[1], from_long, "token ids in chunks")
    assert_matches_hf(outputs[2], from_long, "embeddings in chunks")
