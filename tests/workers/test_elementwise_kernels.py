"""The fused Triton kernels (add + RMSNorm, RoPE, K/V cache write, both at once,
SiLU-and-mul) against
the PyTorch reference path of the same modules: on CUDA (gpu marker), and on CPU through
Triton's interpreter where Triton is installed."""

from __future__ import annotations

import pytest
import torch

from tests.workers.conftest import run_in_triton_interpreter
from workers.layers import RMSNorm, SiluAndMul
from workers.rotary import RotaryEmbedding

# (rows, heads, kv_heads, head_dim, hidden)
SHAPES = [(1, 4, 2, 16, 64), (7, 8, 2, 32, 96), (33, 32, 8, 128, 4096), (5, 6, 6, 80, 200)]


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def _reference_norm(x, weight, eps, residual=None):
    norm = RMSNorm(x.shape[-1], eps, x.dtype)
    norm.weight.data.copy_(weight.cpu())
    return norm(x.cpu(), residual.cpu() if residual is not None else None)


def check_rms_norm(kernels, shape, dtype, device, seed):
    rows, heads, _, head_dim, hidden = shape
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype)
    residual = torch.randn(rows, hidden, generator=gen).to(dtype)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    out, res_out = kernels.rms_norm(x.to(device), weight.to(device), 1e-6, residual.to(device))
    ref_out, ref_res = _reference_norm(x, weight, 1e-6, residual)
    torch.testing.assert_close(res_out.cpu(), ref_res, atol=0, rtol=0)  # the sum rounds once, as HF
    torch.testing.assert_close(out.cpu(), ref_out, **_tol(dtype))
    out, none = kernels.rms_norm(x.to(device), weight.to(device), 1e-6)
    assert none is None
    torch.testing.assert_close(out.cpu(), _reference_norm(x, weight, 1e-6), **_tol(dtype))
    # Per-head norm (Qwen3's q/k norm) of a strided [N, heads, d] view of a wider tensor.
    wide = (torch.randn(rows, heads * head_dim + 24, generator=gen) * 2).to(dtype).to(device)
    per_head = wide[:, 8 : 8 + heads * head_dim].view(rows, heads, head_dim)
    head_weight = (torch.rand(head_dim, generator=gen) + 0.5).to(dtype)
    out, _ = kernels.rms_norm(per_head, head_weight.to(device), 1e-6)
    torch.testing.assert_close(out.cpu(), _reference_norm(per_head, head_weight, 1e-6), **_tol(dtype))


def check_rotary(kernels, shape, dtype, device, seed):
    rows, heads, kv_heads, head_dim, _ = shape
    gen = torch.Generator().manual_seed(seed)
    rope = RotaryEmbedding(head_dim, 512, 500000.0, None, dtype)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, 512, (rows,), generator=gen)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    ref_q, ref_k = rope(positions, q.view(rows, heads, head_dim), k.view(rows, kv_heads, head_dim))
    on_device = qkv.to(device)
    q, k, v = on_device.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    kernels.rotary_(positions.to(device), q.view(rows, heads, head_dim), k.view(rows, kv_heads, head_dim),
                    rope.cos.to(device), rope.sin.to(device))
    torch.testing.assert_close(q.cpu().view(rows, heads, head_dim), ref_q, **_tol(dtype))
    torch.testing.assert_close(k.cpu().view(rows, kv_heads, head_dim), ref_k, **_tol(dtype))
    torch.testing.assert_close(v.cpu(), qkv[:, (heads + kv_heads) * head_dim :], atol=0, rtol=0)


def check_store_kv(kernels, shape, dtype, device, seed):
    rows, _, kv_heads, head_dim, _ = shape
    gen = torch.Generator().manual_seed(seed)
    block_size, num_blocks = 16, rows + 3
    wide = torch.randn(rows, 2 * kv_heads * head_dim + 8, generator=gen).to(dtype)
    k = wide[:, : kv_heads * head_dim].view(rows, kv_heads, head_dim)
    v = wide[:, kv_heads * head_dim : 2 * kv_heads * head_dim].view(rows, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:rows]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_k.view(-1, kv_heads, head_dim)[slots] = k
    expected_v.view(-1, kv_heads, head_dim)[slots] = v
    k_dev, v_dev = k_cache.to(device), v_cache.to(device)
    wide_dev = wide.to(device)
    kernels.store_kv(wide_dev[:, : kv_heads * head_dim].view(rows, kv_heads, head_dim),
                     wide_dev[:, kv_heads * head_dim : 2 * kv_heads * head_dim].view(rows, kv_heads, head_dim),
                     k_dev, v_dev, slots.to(device))
    torch.testing.assert_close(k_dev.cpu(), expected_k, atol=0, rtol=0)
    torch.testing.assert_close(v_dev.cpu(), expected_v, atol=0, rtol=0)


def check_rotary_store_kv(kernels, shape, dtype, device, seed):
    """RoPE and the cache write in one kernel: q and k rotated in place as rotary_ does,
    the rotated k and the untouched v in their cache slots, every other slot as it was."""
    rows, heads, kv_heads, head_dim, _ = shape
    gen = torch.Generator().manual_seed(seed)
    rope = RotaryEmbedding(head_dim, 512, 500000.0, None, dtype)
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    qkv = torch.randn(rows, sum(sizes) + 8, generator=gen).to(dtype)  # q, k, v: strided views
    positions = torch.randint(0, 512, (rows,), generator=gen)
    block_size, num_blocks = 16, rows + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:rows]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    q, k, v, _ = qkv.split(sizes + [8], dim=-1)
    ref_q, ref_k = rope(positions, q.reshape(rows, heads, head_dim), k.reshape(rows, kv_heads, head_dim))
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_k.view(-1, kv_heads, head_dim)[slots] = ref_k
    expected_v.view(-1, kv_heads, head_dim)[slots] = v.reshape(rows, kv_heads, head_dim)
    on_device, k_dev, v_dev = qkv.to(device), k_cache.to(device), v_cache.to(device)
    q, k, v, _ = on_device.split(sizes + [8], dim=-1)
    kernels.rotary_store_kv_(positions.to(device), q.view(rows, heads, head_dim), k.view(rows, kv_heads, head_dim),
                             v.view(rows, kv_heads, head_dim), rope.cos.to(device), rope.sin.to(device),
                             k_dev, v_dev, slots.to(device))
    torch.testing.assert_close(q.cpu().view(rows, heads, head_dim), ref_q, **_tol(dtype))
    torch.testing.assert_close(k.cpu().view(rows, kv_heads, head_dim), ref_k, **_tol(dtype))
    # The cache gets the very values left in k (the same rounding), v bit for bit.
    torch.testing.assert_close(k_dev.cpu().view(-1, kv_heads, head_dim)[slots], k.cpu().view(rows, kv_heads, head_dim),
                               atol=0, rtol=0)
    torch.testing.assert_close(k_dev.cpu(), expected_k, **_tol(dtype))
    torch.testing.assert_close(v_dev.cpu(), expected_v, atol=0, rtol=0)
    torch.testing.assert_close(on_device.cpu()[:, sum(sizes):], qkv[:, sum(sizes):], atol=0, rtol=0)


def check_silu_and_mul(kernels, shape, dtype, device, seed):
    rows, _, _, _, hidden = shape
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, 2 * 3 * hidden, generator=gen) * 4).to(dtype)
    out = kernels.silu_and_mul(x.to(device))
    torch.testing.assert_close(out.cpu(), SiluAndMul()(x), **_tol(dtype))


CHECKS = [check_rms_norm, check_rotary, check_store_kv, check_rotary_store_kv, check_silu_and_mul]


@pytest.mark.gpu
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference_on_cuda(check, shape, dtype):
    from workers.kernels import elementwise

    assert elementwise.is_available(torch.device("cuda"))
    check(elementwise, shape, dtype, "cuda", seed=0)


def test_kernel_logic_in_triton_interpreter():
    """Each kernel's indexing, masks and roundings, run by Triton's CPU interpreter in a
    fresh process (the interpreter must be chosen before the kernels are decorated)."""
    run_in_triton_interpreter(
        "import torch\n"
        "from tests.workers.test_elementwise_kernels import CHECKS, SHAPES\n"
        "from workers.kernels import elementwise\n"
        "for check in CHECKS:\n"
        "    for shape in SHAPES:\n"
        "        for dtype in (torch.float32, torch.float16):\n"
        "            check(elementwise, shape, dtype, 'cpu', seed=1)\n"
        "print('checked')\n"
    )


MODEL_SCRIPT = """
import sys
import torch
from tests.workers import test_models_vs_hf as peer
from workers.kernels import elementwise, gemv, paged_attention, paged_prefill
from workers.parallel import ProcessGroup

# The peer schedules, but two decode steps where theirs have eight: a step of at most
# gemv.MAX_ROWS rows runs the GEMV, whose launches are most of the interpreter's time. The
# last chunk follows the decodes, its keys past Mistral's window in the cache.
SCHEDULES = {"prefill": peer.SCHEDULES["prefill"], "chunked_decode": [[7, 5, 1, 1, 1, 5], [12, 1, 1, 1, 5]]}
assert all(sum(rows) == peer.SEQ_LEN for schedule in SCHEDULES.values() for rows in schedule)
real_gemv_check = gemv.is_available
token_ids = peer._token_ids()
for family, path in zip(sys.argv[1::2], sys.argv[2::2]):
    config, model = peer._build(path, ProcessGroup())
    for name, schedule in SCHEDULES.items():
        expected = peer._run(model, config, ProcessGroup(), token_ids, schedule, peer.EMBED_PREFIX)
        elementwise.is_available = lambda device: True
        paged_attention.is_available = lambda device, head_dim, block_size: True
        paged_prefill.is_available = lambda device, head_dim, block_size: True
        gemv.is_available = lambda device, x, weight, silu_and_mul=False: (
            1 <= x.shape[0] <= gemv.MAX_ROWS and weight.shape[1] % 16 == 0)
        fused = peer._run(model, config, ProcessGroup(), token_ids, schedule, peer.EMBED_PREFIX)
        elementwise.is_available = lambda device: False
        paged_attention.is_available = lambda device, head_dim, block_size: False
        paged_prefill.is_available = lambda device, head_dim, block_size: False
        gemv.is_available = real_gemv_check
        torch.testing.assert_close(fused, expected, atol=2e-4, rtol=2e-4, msg=f"{family} {name}")
print("checked")
"""


def test_model_with_kernels_in_triton_interpreter(tiny_checkpoints):
    """Every family's forward pass with all kernels on (run by the interpreter; one prefill
    kernel launch for all spans of a step; the GEMV
    for steps of at most gemv.MAX_ROWS rows, with SiLU-and-mul fused into down_proj) equals
    the reference path: chunked prefill, decodes beside a prefill, embedding rows. Llama
    with tied embeddings runs the same kernels as llama (only lm_head's weight differs), so
    it is left to the peer tests: the interpreter is the suite's slowest part."""
    families = ("llama", "mistral", "qwen2", "qwen3")
    run_in_triton_interpreter(MODEL_SCRIPT, *[str(a) for f in families for a in (f, tiny_checkpoints(f))])
