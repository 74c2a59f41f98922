"""The peer check: our model (world size 1, and 2 over gloo) against Hugging Face
transformers on the same tiny checkpoint of every family: a whole-prompt prefill, chunked
prefill then decode through the paged cache, and prompt-embedding rows."""

from __future__ import annotations

import pytest
import torch

from tests.workers.conftest import run_distributed
from workers.attention import AttentionMetadata, allocate_kv_caches
from workers.config import ModelConfig
from workers.loader import load_weights
from workers.models import get_model_class
from workers.parallel import ProcessGroup

FAMILIES = ("llama", "llama-tied", "mistral", "qwen2", "qwen3")
SEQ_LEN = 20  # longer than mistral's sliding window (8) and llama3's original context / 4
BLOCK_SIZE = 4
# Per request, the new rows of each step. Request 0: chunked prefill (7, then 5 more with
# context cached) then decodes; request 1: one prefill, then decodes beside request 0's.
SCHEDULES = {
    "prefill": [[SEQ_LEN], [SEQ_LEN]],
    "chunked_decode": [[7, 5] + [1] * 8, [12] + [1] * 8],
}
BLOCK_TABLES = [[1, 3, 5, 7, 9], [10, 8, 6, 4, 2]]  # non-contiguous; block 0 is the null block
EMBED_PREFIX = 12  # prompt rows fed as input_embeds in the embeddings run


def _token_ids() -> torch.Tensor:
    return torch.randint(0, 301, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))


def _build(path, pg: ProcessGroup, dtype=torch.float32):
    config = ModelConfig.from_pretrained(path)
    model = get_model_class(config.architecture)(config, pg, dtype, "cpu")
    load_weights(model, str(path), "auto")
    return config, model


@torch.inference_mode()
def _run(model, config, pg, token_ids, schedule, embed_prefix=0, dtype=torch.float32):
    """Runs the schedule; returns float32 logits [2, SEQ_LEN, vocab] on rank 0, else None.
    Rows at positions < embed_prefix enter as input_embeds (the model's own embedding):
    without a mask on a step of such rows only (the first), with one on the others."""
    caches = allocate_kv_caches(config, pg, 12, BLOCK_SIZE, dtype, "cpu")
    steps = [list(s) for s in schedule]
    done = [0, 0]
    logits = torch.zeros(2, SEQ_LEN, config.vocab_size)
    while any(steps):
        batch = [r for r in (0, 1) if steps[r]]
        new = [steps[r].pop(0) for r in batch]
        meta = AttentionMetadata.build([done[r] for r in batch], new, [BLOCK_TABLES[r] for r in batch], BLOCK_SIZE, "cpu")
        ids = torch.cat([token_ids[r, done[r] : done[r] + n] for r, n in zip(batch, new)])
        embeds_mask = meta.positions < embed_prefix if embed_prefix else None
        embeds = model.model.embed_tokens(ids) if embed_prefix else None
        if embed_prefix:
            ids = ids.masked_fill(embeds_mask, 0)  # the token ids of embedding rows are unused
            if embeds_mask.all():  # as the runner sends a step of embedding rows only
                embeds_mask = None
        hidden = model(ids, meta.positions, meta, caches, input_embeds=embeds, embeds_mask=embeds_mask)
        step_logits = model.compute_logits(hidden)
        for r, n, start in zip(batch, new, meta.query_start_loc.tolist()):
            if step_logits is not None:
                logits[r, done[r] : done[r] + n] = step_logits[start : start + n]
            done[r] += n
    assert all((k[0] == 0).all() and (v[0] == 0).all() for k, v in caches), "null block was written"
    return logits if pg.is_leader else None


def _all_runs(pg: ProcessGroup, paths: dict) -> dict:
    """family -> {run name: logits or None} for every family, on one process group."""
    token_ids = _token_ids()
    results = {}
    for family, path in paths.items():
        config, model = _build(path, pg)
        results[family] = {name: _run(model, config, pg, token_ids, s) for name, s in SCHEDULES.items()}
        results[family]["embeds"] = _run(model, config, pg, token_ids, SCHEDULES["chunked_decode"], EMBED_PREFIX)
    return results


@pytest.fixture(scope="module")
def checkpoint_paths(tiny_checkpoints):
    return {family: tiny_checkpoints(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def hf_logits(checkpoint_paths):
    from transformers import AutoModelForCausalLM

    logits = {}
    with torch.inference_mode():
        for family, path in checkpoint_paths.items():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            logits[family] = model(_token_ids()).logits.float()
    return logits


@pytest.fixture(scope="module")
def tp2_runs(checkpoint_paths):
    return run_distributed(_all_runs, 2, checkpoint_paths)


def _assert_matches_hf(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_world_size_1_matches_hf(family, checkpoint_paths, hf_logits):
    runs = _all_runs(ProcessGroup(), {family: checkpoint_paths[family]})[family]
    _assert_matches_hf(runs["prefill"], hf_logits[family])
    _assert_matches_hf(runs["chunked_decode"], hf_logits[family])
    torch.testing.assert_close(runs["embeds"], runs["chunked_decode"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_world_size_2_matches_hf(family, tp2_runs, hf_logits):
    leader, follower = tp2_runs
    for name in ("prefill", "chunked_decode", "embeds"):
        _assert_matches_hf(leader[family][name], hf_logits[family])
        assert follower[family][name] is None


def test_bfloat16_tracks_hf_bfloat16(checkpoint_paths):
    """bf16 rounds differently from HF's separate q/k/v and gate/up matmuls: compare loosely."""
    from transformers import AutoModelForCausalLM

    path = checkpoint_paths["llama"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        ref = hf(_token_ids()).logits.float()
    config, model = _build(path, ProcessGroup(), torch.bfloat16)
    ours = _run(model, config, ProcessGroup(), _token_ids(), SCHEDULES["chunked_decode"], dtype=torch.bfloat16)
    assert ours.dtype == torch.float32
    scale = ref.abs().max()
    assert (ours - ref).abs().mean() < 2e-3 * scale  # bf16 keeps ~3 significant digits
    assert (ours - ref).abs().max() < 1e-2 * scale
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
