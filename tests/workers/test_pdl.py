"""Programmatic dependent launch (workers/kernels/pdl.py): a chain of decoder layers built
from the Triton kernels, each kernel reading what the one before it wrote, gives bit for
bit the results of the same launches without PDL, eagerly and replayed in a CUDA graph.
A kernel that read its input before waiting for the kernel that writes it would read the
previous replay's values here (gpu marker: needs CUDA, compute capability >= 9.0). On
CPU: the launch options that keep PDL off where it cannot run."""

from __future__ import annotations

import pytest
import torch

from workers.kernels import argmax, elementwise, gemv, paged_attention, pdl

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 1024, 8, 2, 128, 2816
LAYERS, BLOCK_SIZE, CONTEXT = 4, 16, 200


def _weights(gen):
    def w(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16).cuda()

    qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    return [dict(norm1=w(HIDDEN, scale=0.1) + 1, qkv=w(qkv, HIDDEN, scale=HIDDEN ** -0.5),
                 o=w(HIDDEN, HEADS * HEAD_DIM, scale=HIDDEN ** -0.5), norm2=w(HIDDEN, scale=0.1) + 1,
                 gate_up=w(2 * INTERMEDIATE, HIDDEN, scale=HIDDEN ** -0.5),
                 down=w(HIDDEN, INTERMEDIATE, scale=INTERMEDIATE ** -0.5))
            for _ in range(LAYERS)]


def _cache(gen):
    blocks = -(-(CONTEXT + 1) // BLOCK_SIZE)
    shape = (LAYERS, blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k, v = (torch.randn(*shape, generator=gen).to(torch.bfloat16).cuda() for _ in range(2))
    tables = torch.randperm(blocks, generator=gen).view(1, -1).int().cuda()
    slot = tables[0, CONTEXT // BLOCK_SIZE].long() * BLOCK_SIZE + CONTEXT % BLOCK_SIZE
    angles = torch.arange(CONTEXT + 1)[:, None] * 10000 ** (-torch.arange(HEAD_DIM // 2) / (HEAD_DIM // 2))
    return dict(k=k, v=v, tables=tables, slot=slot.view(1), seq_lens=torch.tensor([CONTEXT + 1]).int().cuda(),
                positions=torch.tensor([CONTEXT]).cuda(), cos=angles.cos().cuda(), sin=angles.sin().cuda())


def _step(hidden, layers, cache):
    """One decode step of LAYERS layers (batch 1), then the greedy token."""
    residual = None
    for i, w in enumerate(layers):
        normed, residual = elementwise.rms_norm(hidden, w["norm1"], 1e-5, residual)
        residual = hidden if residual is None else residual
        qkv = gemv.gemv(normed, w["qkv"])
        q = qkv[:, : HEADS * HEAD_DIM].view(1, HEADS, HEAD_DIM)
        k = qkv[:, HEADS * HEAD_DIM: (HEADS + KV_HEADS) * HEAD_DIM].view(1, KV_HEADS, HEAD_DIM)
        v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM:].view(1, KV_HEADS, HEAD_DIM)
        elementwise.rotary_store_kv_(cache["positions"], q, k, v, cache["cos"], cache["sin"],
                                     cache["k"][i], cache["v"][i], cache["slot"])
        attn = paged_attention.paged_decode_attention(q, cache["k"][i], cache["v"][i], cache["tables"],
                                                      cache["seq_lens"], HEAD_DIM ** -0.5)
        out = gemv.gemv(attn.view(1, -1), w["o"])
        normed, residual = elementwise.rms_norm(out, w["norm2"], 1e-5, residual)
        hidden = gemv.gemv(gemv.gemv(normed, w["gate_up"]), w["down"], silu_and_mul=True)
    hidden = hidden + residual
    return hidden, argmax.argmax(hidden)


@pytest.mark.gpu
def test_pdl_chain_matches_serial_launches_eagerly_and_in_a_graph(monkeypatch):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0 or newer")
    assert pdl.launch_options(torch.device("cuda"))["PDL"], "SHARDSERVE_PDL=0 is set: nothing to test"
    gen = torch.Generator().manual_seed(0)
    layers, cache = _weights(gen), _cache(gen)
    inputs = [torch.randn(1, HIDDEN, generator=gen).to(torch.bfloat16).cuda() for _ in range(3)]

    monkeypatch.setattr(pdl, "ENABLED", False)
    serial = [_step(x, layers, cache) for x in inputs]
    monkeypatch.setattr(pdl, "ENABLED", True)
    eager = [_step(x, layers, cache) for x in inputs]

    static = inputs[0].clone()
    _step(static, layers, cache)  # compiles every kernel before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _step(static, layers, cache)
    replayed = []
    for x in inputs * 2:  # each replay's inputs differ from the one before
        static.copy_(x)
        graph.replay()
        replayed.append(tuple(t.clone() for t in captured))
    torch.cuda.synchronize()
    for i, (want_hidden, want_token) in enumerate(serial):
        for got_hidden, got_token in (eager[i], replayed[i], replayed[i + len(inputs)]):
            assert torch.equal(got_hidden, want_hidden) and torch.equal(got_token, want_token), i
    assert not torch.equal(serial[0][0], serial[1][0])  # the inputs matter


def test_launch_options_leave_pdl_off_where_it_cannot_run(monkeypatch):
    """Off the GPU (and with SHARDSERVE_PDL=0) the kernels get PDL=False and no
    launch_pdl option, so Triton's interpreter and older GPUs launch them as before."""
    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert pdl.launch_options(torch.device("cuda", 0)) == {"PDL": False}
