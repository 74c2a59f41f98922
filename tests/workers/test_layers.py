"""TP layers against nn.Linear / nn.Embedding (world size 1, and every rank of a split
checked in-process where a layer has no collective), at world size 2 over gloo, and RoPE
against transformers (imported inside tests: spawned ranks import this module)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.workers.conftest import run_distributed
from workers.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
)
from workers.parallel import ProcessGroup
from workers.rotary import RotaryEmbedding

F32 = torch.float32
H, VOCAB, HEAD_DIM = 32, 37, 8


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _load(layer, slices: dict, names_to_params: dict) -> None:
    """names_to_params: checkpoint name -> (param, shard_id)."""
    for name, (param, shard_id) in names_to_params.items():
        param.weight_loader(param, slices[name], shard_id)


def test_embedding_and_lm_head_world_size_1(as_slices):
    weight = _rand(VOCAB, H)
    s = as_slices({"w": weight})
    emb = VocabParallelEmbedding(VOCAB, H, ProcessGroup(), F32)
    _load(emb, s, {"w": (emb.weight, None)})
    ids = torch.tensor([0, 5, VOCAB - 1, 5])
    torch.testing.assert_close(emb(ids), torch.nn.Embedding.from_pretrained(weight)(ids), rtol=0, atol=0)
    head = ParallelLMHead(VOCAB, H, ProcessGroup(), F32)
    _load(head, s, {"w": (head.weight, None)})
    x = _rand(3, H, seed=1)
    torch.testing.assert_close(head(x), F.linear(x, weight))
    tied = ParallelLMHead(VOCAB, H, ProcessGroup(), F32, tied_embedding=emb)
    assert tied.weight is emb.weight
    assert tied(x).dtype == torch.float32


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_column_layers_concatenate_to_unsplit_linear(as_slices, world_size):
    """Column-parallel layers have no collective: build every rank here and concatenate."""
    w, b = _rand(16, H), _rand(16, seed=1)
    gate, up = _rand(24, H, seed=2), _rand(24, H, seed=3)
    s = as_slices({"w": w, "b": b, "gate": gate, "up": up})
    x = _rand(5, H, seed=4)
    col_parts, gate_parts, up_parts = [], [], []
    for rank in range(world_size):
        pg = ProcessGroup(rank, world_size)
        col = ColumnParallelLinear(H, 16, pg, F32, bias=True)
        _load(col, s, {"w": (col.weight, None), "b": (col.bias, None)})
        col_parts.append(col(x))
        merged = MergedColumnParallelLinear(H, [24, 24], pg, F32)
        _load(merged, s, {"gate": (merged.weight, 0), "up": (merged.weight, 1)})
        g, u = merged(x).split(24 // world_size, dim=-1)
        gate_parts.append(g)
        up_parts.append(u)
        assert SiluAndMul()(merged(x)).shape == (5, 24 // world_size)
    torch.testing.assert_close(torch.cat(col_parts, -1), F.linear(x, w, b))
    torch.testing.assert_close(torch.cat(gate_parts, -1), F.linear(x, gate))
    torch.testing.assert_close(torch.cat(up_parts, -1), F.linear(x, up))


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,world_size",
    [(4, 2, 1), (4, 2, 2), (4, 1, 2), (4, 2, 4), (8, 2, 4), (4, 4, 2)],
)
def test_qkv_splits_heads_and_replicates_kv_heads(as_slices, num_heads, num_kv_heads, world_size):
    d = HEAD_DIM
    q_w, k_w, v_w = _rand(num_heads * d, H), _rand(num_kv_heads * d, H, seed=1), _rand(num_kv_heads * d, H, seed=2)
    q_b, k_b, v_b = _rand(num_heads * d, seed=3), _rand(num_kv_heads * d, seed=4), _rand(num_kv_heads * d, seed=5)
    s = as_slices({"q": q_w, "k": k_w, "v": v_w, "qb": q_b, "kb": k_b, "vb": v_b})
    x = _rand(3, H, seed=6)
    ref_q = F.linear(x, q_w, q_b).view(3, num_heads, d)
    ref_k = F.linear(x, k_w, k_b).view(3, num_kv_heads, d)
    ref_v = F.linear(x, v_w, v_b).view(3, num_kv_heads, d)
    heads_per_rank = num_heads // world_size
    for rank in range(world_size):
        qkv = QKVParallelLinear(H, d, num_heads, num_kv_heads, ProcessGroup(rank, world_size), F32, bias=True)
        names = {"q": "q", "k": "k", "v": "v"}
        _load(qkv, s, {n: (qkv.weight, sid) for n, sid in names.items()})
        _load(qkv, s, {n + "b": (qkv.bias, sid) for n, sid in names.items()})
        q, k, v = qkv(x).split(qkv.local_sizes, dim=-1)
        kv_here = max(1, num_kv_heads // world_size)
        # rank r holds kv head r // (world_size // num_kv_heads) when replicated
        first_kv = rank // (world_size // num_kv_heads) if world_size >= num_kv_heads else rank * kv_here
        torch.testing.assert_close(q.view(3, -1, d), ref_q[:, rank * heads_per_rank : (rank + 1) * heads_per_rank])
        torch.testing.assert_close(k.view(3, -1, d), ref_k[:, first_kv : first_kv + kv_here])
        torch.testing.assert_close(v.view(3, -1, d), ref_v[:, first_kv : first_kv + kv_here])


def test_layer_input_errors_are_value_errors(as_slices):
    with pytest.raises(ValueError, match="num_key_value_heads"):
        QKVParallelLinear(H, HEAD_DIM, 6, 3, ProcessGroup(0, 2), F32)
    with pytest.raises(ValueError, match="divisible"):
        ColumnParallelLinear(H, 15, ProcessGroup(0, 2), F32)
    col = ColumnParallelLinear(H, 16, ProcessGroup(), F32)
    with pytest.raises(ValueError, match="shape"):
        col.weight_loader(col.weight, as_slices({"w": _rand(8, H)})["w"])
    merged = MergedColumnParallelLinear(H, [8, 8], ProcessGroup(), F32)
    with pytest.raises(ValueError, match="shard_id"):
        merged.weight_loader(merged.weight, as_slices({"w": _rand(8, H)})["w"], 2)


def test_row_parallel_and_norms_world_size_1(as_slices):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    w, b = _rand(H, 48), _rand(H, seed=1)
    s = as_slices({"w": w, "b": b})
    row = RowParallelLinear(48, H, ProcessGroup(), F32, bias=True)
    _load(row, s, {"w": (row.weight, None), "b": (row.bias, None)})
    x = _rand(4, 48, seed=2)
    torch.testing.assert_close(row(x), F.linear(x, w, b))
    for dtype in (torch.float32, torch.bfloat16):
        ours, ref = RMSNorm(H, 1e-6, dtype), LlamaRMSNorm(H, eps=1e-6).to(dtype)
        weight = _rand(H, seed=3).to(dtype)
        ours.weight.data.copy_(weight)
        ref.weight.data.copy_(weight)
        x = _rand(4, H, seed=4).to(dtype) * 3
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    gate_up = _rand(4, 2 * H, seed=5)
    torch.testing.assert_close(SiluAndMul()(gate_up), F.silu(gate_up[:, :H]) * gate_up[:, H:])


ROPE_CASES = [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
]


@pytest.mark.parametrize("rope", ROPE_CASES, ids=lambda r: r["rope_type"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_transformers(rope, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    d, max_pos = 32, 512
    hf_config = LlamaConfig(
        hidden_size=4 * d, num_attention_heads=4, head_dim=d, max_position_embeddings=max_pos, rope_parameters=dict(rope)
    )
    hf_rope = LlamaRotaryEmbedding(hf_config)
    scaling = None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    ours = RotaryEmbedding(d, max_pos, rope["rope_theta"], scaling, dtype)
    positions = torch.tensor([0, 1, 7, 63, 64, 200, 511])
    q, k = _rand(7, 4, d).to(dtype), _rand(7, 2, d, seed=1).to(dtype)
    cos, sin = hf_rope(q, positions[None])  # [1, N, d]
    # HF layout is [batch, heads, seq, d]; ours is [seq, heads, d]
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    our_q, our_k = ours(positions, q, k)
    torch.testing.assert_close(our_q, ref_q[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(our_k, ref_k[0].transpose(0, 1), rtol=0, atol=0)


def test_unsupported_rope_type_is_a_value_error():
    with pytest.raises(ValueError, match="yarn"):
        RotaryEmbedding(16, 64, 10000.0, {"rope_type": "yarn", "factor": 2.0}, F32)
    with pytest.raises(ValueError, match="factor"):
        RotaryEmbedding(16, 64, 10000.0, {"rope_type": "linear"}, F32)


def _collective_layers(pg: ProcessGroup, weights: dict) -> dict:
    """On each rank: the layers that communicate, loaded from real safetensors slices."""
    from safetensors import safe_open

    f = safe_open(weights["path"], framework="pt", device="cpu")
    emb = VocabParallelEmbedding(VOCAB, H, pg, F32)
    emb.weight_loader(emb.weight, f.get_slice("emb"))
    head = ParallelLMHead(VOCAB, H, pg, F32)
    head.weight_loader(head.weight, f.get_slice("head"))
    tied = ParallelLMHead(VOCAB, H, pg, F32, tied_embedding=emb)
    row = RowParallelLinear(48, H, pg, F32, bias=True)
    row.weight_loader(row.weight, f.get_slice("row"))
    row.bias.weight_loader(row.bias, f.get_slice("row_bias"))
    x, ids, row_in = weights["x"], weights["ids"], weights["row_in"]
    shard = row_in[:, pg.rank * 48 // pg.world_size : (pg.rank + 1) * 48 // pg.world_size]
    return {
        "embedding": emb(ids),
        "padded_rows_zero": bool((emb.weight[VOCAB - emb.vocab_start :] == 0).all()) if pg.rank else True,
        "logits": head(x),
        "tied_logits": tied(x),
        "row": row(shard),
    }


def test_collective_layers_at_world_size_2(tmp_path):
    from safetensors.torch import save_file

    tensors = {"emb": _rand(VOCAB, H), "head": _rand(VOCAB, H, seed=1), "row": _rand(H, 48, seed=2), "row_bias": _rand(H, seed=3)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    inputs = {
        "path": str(tmp_path / "w.safetensors"),
        "x": _rand(3, H, seed=4),
        "ids": torch.tensor([0, 18, 19, VOCAB - 1, 3, 20]),  # both sides of the split at 19
        "row_in": _rand(5, 48, seed=5),
    }
    ranks = run_distributed(_collective_layers, 2, inputs)
    for result in ranks:
        torch.testing.assert_close(result["embedding"], F.embedding(inputs["ids"], tensors["emb"]))
        torch.testing.assert_close(result["row"], F.linear(inputs["row_in"], tensors["row"], tensors["row_bias"]))
        assert result["padded_rows_zero"]
    torch.testing.assert_close(ranks[0]["logits"], F.linear(inputs["x"], tensors["head"]))
    torch.testing.assert_close(ranks[0]["tied_logits"], F.linear(inputs["x"], tensors["emb"]))
    # Every rank holds the same logits, bit for bit (followers take greedy feedback from them).
    assert torch.equal(ranks[1]["logits"], ranks[0]["logits"])
    assert torch.equal(ranks[1]["tied_logits"], ranks[0]["tied_logits"])
