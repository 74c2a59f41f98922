"""The greedy argmax kernels (workers/kernels/argmax.py) give torch.argmax's index, the
first on ties: rows of many equal maxima across block borders, -inf rows, vocabularies
that are and are not multiples of the block; on CPU through Triton's interpreter and on
CUDA (gpu marker) at real vocabulary sizes, and through the Sampler's greedy path."""

from __future__ import annotations

import pytest
import torch

from tests.workers.conftest import run_in_triton_interpreter
from workers.kernels import argmax as argmax_module


def tied_logits(rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Small integers, so each row's max occurs many times (ties across blocks); row 1
    holds one max in the last column, row 2 (if any) is all -inf."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 4, (rows, vocab), generator=gen).to(dtype)
    if rows > 1:
        x[1] = -8
        x[1, -1] = 3
    if rows > 2:
        x[2] = float("-inf")
    return x


CHECK = """
import sys, torch
from tests.workers.test_argmax_kernel import tied_logits
from workers.kernels.argmax import BLOCK, triton_argmax
for vocab in (1, 7, BLOCK, BLOCK + 1, 3 * BLOCK - 5):
    for dtype in (torch.float32, torch.bfloat16):
        x = tied_logits(3, vocab, dtype, seed=vocab)
        got, want = triton_argmax(x), x.argmax(dim=-1)
        assert torch.equal(got, want), (vocab, dtype, got, want)
wide = torch.zeros(2, 2 * BLOCK + 10)[:, 3:3 + BLOCK + 2]  # row stride past the row's end
wide[0, BLOCK + 1] = 1.0
assert triton_argmax(wide).tolist() == [BLOCK + 1, 0]
print("checked")
"""


def test_kernels_in_triton_interpreter():
    run_in_triton_interpreter(CHECK)


def test_argmax_falls_back_to_torch_off_cuda():
    x = tied_logits(3, 50, torch.float32, seed=0)
    assert torch.equal(argmax_module.argmax(x), x.argmax(dim=-1))


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32000, 128256, 151936, 4096 * 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernels_match_torch_on_cuda(vocab, dtype):
    for rows, seed in ((1, 0), (3, 1), (64, 2)):
        x = tied_logits(rows, vocab, dtype, seed).cuda()
        assert argmax_module.is_available(x)
        assert torch.equal(argmax_module.argmax(x), x.argmax(dim=-1))
        noisy = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)).to(dtype).cuda()
        assert torch.equal(argmax_module.argmax(noisy), noisy.argmax(dim=-1))


@pytest.mark.gpu
def test_sampler_greedy_path_reads_model_dtype_logits():
    """All-greedy batches without logprobs take the kernels on the bf16 logits; with
    logprobs the float32 path; both give torch's tokens."""
    from workers.request import Request
    from workers.messages import NewRequest
    from workers.sampler import Sampler
    from workers.sampling_params import SamplingParams

    logits = tied_logits(4, 128256, torch.bfloat16, seed=5).cuda()
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=2)):
        requests = [Request.from_new_request(NewRequest(f"r{i}", (1, 2), None, params), (0,), 64,
                                             device=logits.device) for i in range(4)]
        sampled = Sampler()(logits, requests)
        assert [s.token_id for s in sampled] == logits.float().argmax(dim=-1).tolist()
