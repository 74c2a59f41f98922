"""CUDA-graph steps give the same greedy tokens and log-probabilities as eager steps:
decode batches that need padding to a bucket, and one request's prefill padded to a
row-count bucket, for token ids and prompt_embeds (gpu marker: needs CUDA)."""

from __future__ import annotations

import pytest
import ray
import torch

from cluster import LLM, SamplingParams
from tests.checkpoints import make_tiny_checkpoint
from tests.comparisons import assert_same_samples


def _replays(llm, graphs: str) -> dict:
    """The leader's replays per bucket of its runner's `graphs` (decode_graphs or
    prefill_graphs); {} when it has none (eager)."""
    return ray.get(llm.engine.leader.__ray_call__.remote(
        lambda shard: dict(getattr(shard.runner, graphs).replays) if getattr(shard.runner, graphs) else {}))


def _embedding_table(llm) -> torch.Tensor:
    """The leader's input-embedding table, float32 on the CPU: prompt_embeds of token ids."""
    return ray.get(llm.engine.leader.__ray_call__.remote(
        lambda shard: shard.runner.model.model.embed_tokens.weight.float().cpu()))


def _run(path, enforce_eager: bool):
    gen = torch.Generator().manual_seed(3)
    prompts = [{"prompt_token_ids": torch.randint(3, 300, (n,), generator=gen).tolist()} for n in (3, 9, 17, 30, 5)]
    # Different lengths: the decode batch shrinks 5 -> 1 as requests finish (buckets 8, 4, 2, 1).
    params = [SamplingParams(temperature=0.0, max_tokens=m, logprobs=3, ignore_eos=True) for m in (4, 9, 13, 20, 24)]
    with LLM(str(path), enforce_eager=enforce_eager, max_model_len=128, kv_cache_memory_bytes=16 << 20) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        replays = _replays(llm, "decode_graphs")
    return [o.outputs[0] for o in outputs], replays


@pytest.mark.gpu
def test_graph_decode_matches_eager(ray_cluster, tiny_checkpoints):
    path = tiny_checkpoints("llama")
    graphed, replays = _run(path, enforce_eager=False)
    eager, no_replays = _run(path, enforce_eager=True)
    assert no_replays == {} and all(replays.get(bucket, 0) > 0 for bucket in (1, 2, 4, 8)), replays
    assert_same_samples(eager, graphed, atol=1e-3)


def _run_one_at_a_time(path, enforce_eager: bool):
    """Prompts sent one by one, so each prefill is the step's only request."""
    gen = torch.Generator().manual_seed(4)
    prompts = [{"prompt_token_ids": torch.randint(3, 300, (n,), generator=gen).tolist()} for n in (3, 16, 17, 30, 70)]
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, ignore_eos=True)
    outputs = []
    with LLM(str(path), enforce_eager=enforce_eager, max_model_len=128, kv_cache_memory_bytes=16 << 20,
             enable_prompt_embeds=True) as llm:
        table = _embedding_table(llm)
        prompts.append({"prompt_embeds": table[torch.tensor(prompts[3]["prompt_token_ids"])]})
        for prompt in prompts:
            outputs += llm.generate([prompt], params, use_tqdm=False)
        replays = _replays(llm, "prefill_graphs")
    return [o.outputs[0] for o in outputs], replays


@pytest.mark.gpu
def test_graph_prefill_matches_eager(ray_cluster, tiny_checkpoints):
    path = tiny_checkpoints("llama")
    graphed, replays = _run_one_at_a_time(path, enforce_eager=False)
    eager, no_replays = _run_one_at_a_time(path, enforce_eager=True)
    # 3 -> 16, 16 -> 16, 17 and 30 -> 32 (twice: ids, then the same rows as embeddings), 70 -> 128.
    assert no_replays == {} and replays == {16: 2, 32: 3, 128: 1}, replays
    assert_same_samples(eager, graphed, atol=1e-3)
    assert graphed[3].token_ids == graphed[5].token_ids  # embeddings of the same ids


def _run_chunked(path, enforce_eager: bool):
    """One long prompt at a time, in prefill chunks of 16 rows that sample nothing until the
    last: the host queues chunk after chunk without waiting for the device, through the
    prefill graphs' staging buffers (token ids, then the same rows as embeddings). Each
    call computes its whole prompt: no prefix cache serves the repeats."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 300, (220,), generator=gen).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=3, ignore_eos=True)
    outputs = []
    with LLM(str(path), enforce_eager=enforce_eager, max_model_len=256, kv_cache_memory_bytes=16 << 20,
             enable_prompt_embeds=True, max_num_batched_tokens=16, enable_prefix_caching=False) as llm:
        table = _embedding_table(llm)
        for prompt in ({"prompt_token_ids": ids}, {"prompt_embeds": table[torch.tensor(ids)]}) * 2:
            outputs += llm.generate([prompt], params, use_tqdm=False)
        replays = _replays(llm, "prefill_graphs")
    return [o.outputs[0] for o in outputs], replays


@pytest.mark.gpu
def test_graph_prefill_chunks_queued_ahead_match_eager(ray_cluster, tiny_checkpoints):
    """Seen before the staging buffers waited for their copies: two identical chunked calls
    of a 300-token prompt on CUDA disagreed by 0.4 in a generated token's log-probability
    (.device/gpu_chunk_diverge.py, session 11)."""
    path = tiny_checkpoints("llama")
    graphed, replays = _run_chunked(path, enforce_eager=False)
    eager, no_replays = _run_chunked(path, enforce_eager=True)
    assert no_replays == {} and replays.get(16, 0) >= 4 * 13, replays  # 14 chunks a prompt
    assert_same_samples(eager, graphed, atol=1e-3)
    assert_same_samples(graphed[:2], graphed[2:], atol=1e-9)  # the same calls again: the same bits


def _run_mixed(path, enforce_eager: bool):
    """Six prompts of staggered lengths through two seats: as one request ends, the next
    joins the other's decodes, so steps mix a decode with one prefill (token ids, then
    embedding rows), each step one replay of the prefill graphs."""
    gen = torch.Generator().manual_seed(6)
    ids = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (5, 20, 9, 33, 17, 12)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, logprobs=3, ignore_eos=True) for m in (3, 11, 6, 9, 4, 7)]
    with LLM(str(path), enforce_eager=enforce_eager, max_model_len=128, kv_cache_memory_bytes=16 << 20,
             enable_prompt_embeds=True, max_num_seqs=2, enable_prefix_caching=False) as llm:
        table = _embedding_table(llm)
        prompts = [{"prompt_token_ids": x} for x in ids[:3]] + [{"prompt_embeds": table[torch.tensor(x)]} for x in ids[3:]]
        ray.get(llm.engine.leader.__ray_call__.remote(_count_prefill_steps))
        outputs = llm.generate(prompts, params, use_tqdm=False)
        replays = _replays(llm, "prefill_graphs")
        steps = ray.get(llm.engine.leader.__ray_call__.remote(lambda shard: shard.runner.num_prefill_steps))
    return [o.outputs[0] for o in outputs], replays, steps


def _count_prefill_steps(shard) -> None:
    """Counts the leader runner's steps that the decode graphs do not run (those with a
    prefill span) in runner.num_prefill_steps."""
    runner, execute = shard.runner, shard.runner.execute
    runner.num_prefill_steps = 0

    def counted(scheduled):
        runner.num_prefill_steps += bool(scheduled) and not runner._is_graphable(scheduled)
        return execute(scheduled)

    runner.execute = counted


@pytest.mark.gpu
def test_graph_mixed_steps_match_eager(ray_cluster, tiny_checkpoints):
    path = tiny_checkpoints("llama")
    graphed, replays, steps = _run_mixed(path, enforce_eager=False)
    eager, no_replays, _ = _run_mixed(path, enforce_eager=True)
    # Six prefills, in three to six steps (how many share a step depends on when each
    # request reaches the engine and ends), each step one replay.
    assert no_replays == {} and 3 <= steps <= 6 and sum(replays.values()) == steps, (replays, steps)
    assert_same_samples(eager, graphed, atol=1e-3)


def _count_eager_passes(shard) -> bool:
    """On the shard: counts the model's eager forward passes (a graph's replay makes none)."""
    forward = shard.runner.model.forward
    shard._eager_passes = 0

    def counted(*args, **kwargs):
        shard._eager_passes += 1
        return forward(*args, **kwargs)
    shard.runner.model.forward = counted
    return True


@pytest.mark.gpu
def test_eager_steps_compile_no_kernel_while_serving(ray_cluster, tmp_path):
    """The start-up's warm-up compiles what eager steps launch: steps the graphs do not
    take (past 2,048 rows here; also more than 64 requests with more than four prefills;
    contexts of many block-table widths; 1 to 4 sampled rows for the LM head's GEMV in
    bfloat16) compile no Triton kernel once the engine serves (session 18 saw a one-time
    1.35 s stall in a server's first burst)."""
    path = make_tiny_checkpoint("llama", tmp_path / "llama-1024", max_position_embeddings=1024)
    gen = torch.Generator().manual_seed(5)
    lengths = (3, 40, 700, 17, 530, 90, 5, 610, 64, 300, 33, 8, 1000, 12, 45, 260, 7, 900, 128, 20)
    prompts = [{"prompt_token_ids": torch.randint(3, 300, (n,), generator=gen).tolist()} for n in lengths]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
              for m in (3, 7, 11, 5, 9, 2, 13, 4, 6, 8, 10, 1, 5, 12, 3, 9, 7, 2, 6, 4)]
    with LLM(str(path), dtype="bfloat16", max_model_len=1024, max_num_seqs=20, max_num_batched_tokens=4096,
             kv_cache_memory_bytes=64 << 20) as llm:
        watching = ray.get(llm.engine.leader.__ray_call__.remote(lambda shard: shard._compiles._serving))
        ray.get(llm.engine.leader.__ray_call__.remote(_count_eager_passes))
        outputs = llm.generate(prompts, params, use_tqdm=False)
        compiles = llm.engine.stats().num_kernel_compiles
        compiled = ray.get(llm.engine.leader.__ray_call__.remote(lambda shard: list(shard._compiles.recent)))
        eager_passes = ray.get(llm.engine.leader.__ray_call__.remote(lambda shard: shard._eager_passes))
    assert watching and eager_passes >= 1  # some steps did run eagerly
    assert [len(o.outputs[0].token_ids) for o in outputs] == [p.max_tokens for p in params]
    assert compiles == 0, "\n".join(compiled)


@pytest.mark.gpu
def test_a_mixed_prompts_prefill_in_graphs_matches_its_ids(ray_cluster, tiny_checkpoints):
    """A prompt of token ids and embeddings (the rows: the model's own embeddings of the
    ids there) prefills in the prefill graphs, alone and beside other requests, and
    continues as the same ids do."""
    path = tiny_checkpoints("llama")
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 300, (37,), generator=gen).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2, ignore_eos=True)
    with LLM(str(path), max_model_len=128, kv_cache_memory_bytes=16 << 20, enable_prompt_embeds=True,
             enable_prefix_caching=False) as llm:
        table = _embedding_table(llm)
        is_token = [position % 7 not in (2, 3) for position in range(len(ids))]
        mixed = {"prompt_token_ids": ids, "prompt_embeds": table[torch.tensor(ids)], "prompt_is_token_ids": is_token}
        reference = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs[0]
        before = sum(_replays(llm, "prefill_graphs").values())
        alone = llm.generate([mixed], params, use_tqdm=False)[0].outputs[0]
        assert sum(_replays(llm, "prefill_graphs").values()) > before, "the mixed prefill ran in a graph"
        others = [{"prompt_token_ids": torch.randint(3, 300, (n,), generator=gen).tolist()} for n in (5, 19)]
        beside = llm.generate([mixed, *others], params, use_tqdm=False)[0].outputs[0]
        assert _replays(llm, "decode_graphs"), "the decodes ran in graphs"
    assert_same_samples([reference, reference], [alone, beside], atol=1e-3)
