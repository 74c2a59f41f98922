"""What the peer-check modules share: their prompts (and seeded random token ids), the
comparison of one output with Hugging Face's greedy reference, and the skip for a
tensor-parallel size the machine's GPUs cannot hold."""

from __future__ import annotations

import pytest
import ray
import torch

MAX_TOKENS = 8
LOGPROBS = 5


def random_ids(seed: int, length: int, vocab: int) -> list[int]:
    """Seeded random token ids in [5, vocab): clear of the small ids tokenizers keep for specials."""
    return torch.randint(5, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def peer_prompts(hf_model):
    """(short token ids, 37 token ids crossing KV blocks, 11 random embedding rows)."""
    gen = torch.Generator().manual_seed(7)
    vocab_size = hf_model.config.vocab_size
    short = torch.randint(3, vocab_size, (5,), generator=gen).tolist()
    long = torch.randint(3, vocab_size, (37,), generator=gen).tolist()
    random_embeds = torch.randn(11, hf_model.config.hidden_size, generator=gen)
    return short, long, random_embeds


def assert_matches_hf(output, reference, where: str) -> None:
    """Greedy tokens equal; the top LOGPROBS token ids in Hugging Face's order, and their
    log-probabilities within 2e-4, at each of MAX_TOKENS steps."""
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


def skip_unless_gpus_hold(tensor_parallel_size: int) -> None:
    """On a Ray cluster with GPUs, LLM gives each shard a GPU of its own: a test of more
    shards than the cluster has GPUs is skipped, with the reason shown, instead of
    failing after the placement timeout. CPU clusters run every size."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if 0 < gpus < tensor_parallel_size:
        pytest.skip(f"tensor_parallel_size={tensor_parallel_size} needs {tensor_parallel_size} GPUs; "
                    f"this Ray cluster has {gpus}")
