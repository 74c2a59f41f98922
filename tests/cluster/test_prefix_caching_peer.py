"""Peer check of prefix caching: prompts that start with a prefix an earlier call computed
reuse its KV blocks (token ids and embedding rows alike), and their tokens and
log-probabilities still match Hugging Face's at tensor_parallel_size 1 and 2."""

from __future__ import annotations

import pytest

import cluster.engine_client as engine_client
from cluster import LLM, SamplingParams
from tests.cluster.peer_checks import LOGPROBS, MAX_TOKENS, assert_matches_hf, random_ids, skip_unless_gpus_hold
from tests.hf_reference import embed_tokens, hf_greedy, load_hf_model

BLOCK_SIZE = 16


@pytest.mark.parametrize("tp, digests", [(1, "at-put"), (2, "at-put"), (1, "hasher")],
                         ids=["tp1", "tp2", "tp1-hasher"])
def test_prompts_after_a_cached_prefix_match_hf(ray_cluster, tiny_checkpoints, tp, digests, monkeypatch):
    """Embeddings rows' digests made where they are put (a small put), or by the hasher actor
    (INLINE_DIGESTS_MAX_BYTES 0: every put), key the same blocks."""
    skip_unless_gpus_hold(tp)
    if digests == "hasher":
        monkeypatch.setattr(engine_client, "INLINE_DIGESTS_MAX_BYTES", 0)
    path = tiny_checkpoints("llama")
    hf_model = load_hf_model(path)
    vocab = hf_model.config.vocab_size
    prefix = random_ids(11, 40, vocab)  # two full blocks and a half
    first, second = prefix + random_ids(12, 5, vocab), prefix + random_ids(13, 9, vocab)
    third = random_ids(14, 40, vocab)
    prompts = {
        "ids": [{"prompt_token_ids": first}, {"prompt_token_ids": second}],
        "embeds": [{"prompt_embeds": embed_tokens(hf_model, first)},
                   {"prompt_embeds": embed_tokens(hf_model, second)}],
    }
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=LOGPROBS, ignore_eos=True)
    with LLM(str(path), tensor_parallel_size=tp, enable_prompt_embeds=True, max_model_len=128,
             kv_cache_memory_bytes=16 << 20) as llm:
        assert llm.config.block_size == BLOCK_SIZE and llm.config.enable_prefix_caching
        outputs = llm.generate([prompts["ids"][0], prompts["embeds"][0]], params, use_tqdm=False)
        before = llm.engine.stats()
        outputs += llm.generate([prompts["ids"][1], prompts["embeds"][1]], params, use_tqdm=False)
        after = llm.engine.stats()
        # One call, each prompt twice: the copies admitted beside the first share its
        # blocks in the step that computes them.
        twice = [{"prompt_token_ids": third}] * 2 + [{"prompt_embeds": embed_tokens(hf_model, third)}] * 2
        outputs += llm.generate(twice, params, use_tqdm=False)
        last = llm.engine.stats()
    # Each second prompt found the first one's two full prefix blocks, of its own kind.
    assert after.prefix_cache_hits - before.prefix_cache_hits == 2 * 2 * BLOCK_SIZE
    assert after.prefix_cache_queries - before.prefix_cache_queries == 2 * len(second)
    assert last.prefix_cache_hits - after.prefix_cache_hits == 2 * 2 * BLOCK_SIZE
    # Each output says how many of its prompt's tokens came from the cache, as vLLM's; of
    # two copies in one call, whichever reached the leader first computed the blocks.
    cached = [o.num_cached_tokens for o in outputs]
    assert cached[:4] == [0, 0, 2 * BLOCK_SIZE, 2 * BLOCK_SIZE]
    assert sorted(cached[4:6]) == sorted(cached[6:]) == [0, 2 * BLOCK_SIZE]
    from_first = hf_greedy(hf_model, MAX_TOKENS, input_ids=first)
    from_second = hf_greedy(hf_model, MAX_TOKENS, input_ids=second)
    assert_matches_hf(outputs[0], from_first, "token ids, computing the prefix")
    assert_matches_hf(outputs[1], from_first, "embeddings, computing the prefix")
    assert_matches_hf(outputs[2], from_second, "token ids after the cached prefix")
    assert_matches_hf(outputs[3], from_second, "embeddings after the cached prefix")
    from_third = hf_greedy(hf_model, MAX_TOKENS, input_ids=third)
    for output, where in zip(outputs[4:], ("ids", "ids, sharing in its step", "embeddings",
                                            "embeddings, sharing in its step")):
        assert_matches_hf(output, from_third, where)


def test_without_prefix_caching_nothing_is_reused(ray_cluster, tiny_checkpoints):
    path = tiny_checkpoints("llama")
    prompt = {"prompt_token_ids": random_ids(11, 40, 300)}
    params = SamplingParams(temperature=0.0, max_tokens=2)
    with LLM(str(path), max_model_len=128, kv_cache_memory_bytes=16 << 20, enable_prefix_caching=False) as llm:
        first, second = (llm.generate([prompt], params, use_tqdm=False)[0] for _ in range(2))
        stats = llm.engine.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (0, 0)
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
