"""Tensor-parallel layers (Megatron style): each holds its rank's slice of a weight, reads
only that slice from the checkpoint, and runs its collective in `forward`. Runs in each shard."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from workers.kernels import elementwise, gemv
from workers.parallel import ProcessGroup

# SHARDSERVE_USE_GEMV=0 keeps cuBLAS for decode steps of a few rows (an ablation switch).
USE_GEMV = os.environ.get("SHARDSERVE_USE_GEMV", "1") != "0"


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    """Replicated parameter: every rank reads the whole tensor."""
    if tuple(loaded.get_shape()) != tuple(param.shape):
        raise ValueError(
            f"checkpoint tensor has shape {tuple(loaded.get_shape())}, "
            f"the parameter expects {tuple(param.shape)}"
        )
    param.data.copy_(loaded[:])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           silu_and_mul: bool = False) -> torch.Tensor:
    """x W^T + b: the GEMV kernel for the few rows of a small decode step on CUDA, where
    reading the weight is the whole cost; F.linear otherwise. silu_and_mul: x holds
    [gate | up] and the product is of silu(gate) * up (fused into the GEMV when it runs)."""
    if USE_GEMV and gemv.is_available(x.device, x, weight, silu_and_mul=silu_and_mul):
        out = gemv.gemv(x, weight, silu_and_mul=silu_and_mul)
        return out if bias is None else out + bias
    return F.linear(_SILU_AND_MUL(x) if silu_and_mul else x, weight, bias)


def num_local_kv_heads(num_kv_heads: int, world_size: int) -> int:
    """KV heads a rank holds: split when there are enough, else one replicated head."""
    return max(1, num_kv_heads // world_size)


def _split(size: int, world_size: int, what: str) -> int:
    if size % world_size:
        raise ValueError(f"{what} ({size}) must be divisible by the tensor-parallel size ({world_size})")
    return size // world_size


def _new_param(shape: tuple[int, ...], dtype, device, loader) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    param.weight_loader = loader
    return param


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{name}: checkpoint slice has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


class VocabParallelEmbedding(nn.Module):
    """Token embedding with vocab rows split across ranks.

    weight: [padded_vocab / world_size, hidden]; the vocab is padded up to a multiple of
    world_size and padded rows stay zero. forward(ids [N]) -> [N, hidden] after all_reduce:
    each rank embeds only ids in its range, zeroes the others, and the sum fills every row.
    """

    def __init__(self, vocab_size: int, hidden_size: int, pg: ProcessGroup, dtype, device=None):
        super().__init__()
        self.pg = pg
        self.vocab_size = vocab_size
        self.num_padded_vocab = -(-vocab_size // pg.world_size) * pg.world_size
        self.num_local_rows = self.num_padded_vocab // pg.world_size
        self.vocab_start = pg.rank * self.num_local_rows
        self.vocab_end = self.vocab_start + self.num_local_rows
        self.weight = _new_param((self.num_local_rows, hidden_size), dtype, device, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        end = min(self.vocab_end, self.vocab_size)
        num_real = max(0, end - self.vocab_start)
        param.data.zero_()
        if num_real:
            _copy_checked(param.data[:num_real], loaded[self.vocab_start : end], "vocab rows")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.pg.world_size == 1:
            return F.embedding(input_ids, self.weight)
        is_local = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = (input_ids - self.vocab_start) * is_local  # foreign ids -> row 0
        out = F.embedding(local_ids, self.weight)
        out.masked_fill_(~is_local.unsqueeze(-1), 0)
        return self.pg.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection with vocab columns split like the embedding.

    forward(hidden [M, H]) -> float32 logits [M, vocab_size] on every rank (pg.gather of
    each rank's [M, padded_vocab / world_size], padding trimmed): the leader samples from
    them, and followers take greedy feedback tokens from them (ModelRunner.apply).
    With `tied_embedding`, the weight is that embedding's local shard (Llama-3.2-1B style).
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        pg: ProcessGroup,
        dtype,
        device=None,
        tied_embedding: VocabParallelEmbedding | None = None,
    ):
        # A tied head allocates nothing of its own (meta), then shares the embedding's shard.
        is_tied = tied_embedding is not None
        super().__init__(vocab_size, hidden_size, pg, dtype, "meta" if is_tied else device)
        if is_tied:
            self.weight = tied_embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local_logits = linear(hidden, self.weight)  # [M, padded_vocab / world_size]
        return self.pg.gather(local_logits, dim=-1)[:, : self.vocab_size].float()


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split: weight [output / world_size, input].

    forward(x [N, input]) -> [N, output / world_size]; no communication.
    """

    def __init__(self, input_size: int, output_size: int, pg: ProcessGroup, dtype, bias=False, device=None):
        super().__init__()
        self.pg = pg
        self.num_local_out = _split(output_size, pg.world_size, "output size")
        self.weight = _new_param((self.num_local_out, input_size), dtype, device, self.weight_loader)
        self.bias = _new_param((self.num_local_out,), dtype, device, self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        start = self.pg.rank * self.num_local_out
        _copy_checked(param.data, loaded[start : start + self.num_local_out], "column slice")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections in one matmul (gate_proj + up_proj).

    weight [sum(output_sizes) / world_size, input]: this rank's slice of shard 0, then of
    shard 1, ... forward(x [N, input]) -> [N, sum(output_sizes) / world_size].
    """

    def __init__(self, input_size: int, output_sizes: list[int], pg: ProcessGroup, dtype, bias=False, device=None):
        super().__init__(input_size, sum(output_sizes), pg, dtype, bias, device)
        self.local_sizes = [_split(s, pg.world_size, "merged output size") for s in output_sizes]

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if shard_id not in range(len(self.local_sizes)):
            raise ValueError(f"shard_id must be one of 0..{len(self.local_sizes) - 1}, got {shard_id!r}")
        size = self.local_sizes[shard_id]
        offset = sum(self.local_sizes[:shard_id])
        start = self.pg.rank * size
        _copy_checked(param.data[offset : offset + size], loaded[start : start + size], f"shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul, attention heads split across ranks.

    weight [(q_heads + 2 * kv_heads) * head_dim, hidden] locally, laid out [q | k | v].
    When world_size > num_kv_heads each rank holds one KV head, replicated: rank r holds
    KV head r // (world_size // num_kv_heads). forward(x [N, hidden]) -> [N, local q+k+v].
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        pg: ProcessGroup,
        dtype,
        bias=False,
        device=None,
    ):
        ws = pg.world_size
        if (ws >= num_kv_heads and ws % num_kv_heads) or (ws < num_kv_heads and num_kv_heads % ws):
            raise ValueError(
                f"num_key_value_heads ({num_kv_heads}) and tensor-parallel size ({ws}) must divide one another"
            )
        num_heads_here = _split(num_heads, ws, "num_attention_heads")
        num_kv_here = num_local_kv_heads(num_kv_heads, ws)
        super().__init__(hidden_size, (num_heads_here + 2 * num_kv_here) * head_dim * ws, pg, dtype, bias, device)
        self.head_dim = head_dim
        self.num_local_heads = num_heads_here
        self.num_local_kv_heads = num_kv_here
        if ws >= num_kv_heads:
            self.kv_head_start = pg.rank // (ws // num_kv_heads)  # replicated: ranks share a head
        else:
            self.kv_head_start = pg.rank * num_kv_here

    @property
    def local_sizes(self) -> list[int]:
        kv = self.num_local_kv_heads * self.head_dim
        return [self.num_local_heads * self.head_dim, kv, kv]

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        q_size, kv_size, _ = self.local_sizes
        if shard_id == "q":
            offset, size, start = 0, q_size, self.pg.rank * q_size
        elif shard_id in ("k", "v"):
            offset = q_size + (kv_size if shard_id == "v" else 0)
            size, start = kv_size, self.kv_head_start * self.head_dim
        else:
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        _copy_checked(param.data[offset : offset + size], loaded[start : start + size], f"{shard_id} heads")


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split: weight [output, input / world_size].

    forward(x [N, input / world_size]) -> [N, output]: partial products are summed by
    all_reduce; the bias (replicated) is added once, after the reduce. silu_and_mul:
    x is [N, 2 * input / world_size] holding [gate | up], and the input is silu(gate) * up.
    """

    def __init__(self, input_size: int, output_size: int, pg: ProcessGroup, dtype, bias=False, device=None):
        super().__init__()
        self.pg = pg
        self.num_local_in = _split(input_size, pg.world_size, "input size")
        self.weight = _new_param((output_size, self.num_local_in), dtype, device, self.weight_loader)
        self.bias = _new_param((output_size,), dtype, device, default_weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        start = self.pg.rank * self.num_local_in
        _copy_checked(param.data, loaded[:, start : start + self.num_local_in], "row slice")

    def forward(self, x: torch.Tensor, silu_and_mul: bool = False) -> torch.Tensor:
        out = self.pg.all_reduce(linear(x, self.weight, silu_and_mul=silu_and_mul))
        return out if self.bias is None else out + self.bias


class RMSNorm(nn.Module):
    """HF RMSNorm over the last dim: statistics in float32, scale in the input dtype.
    weight [size], replicated on every rank.

    forward(x) -> norm(x); forward(x, residual) -> (norm(x + residual), x + residual): the
    residual add of a pre-norm block fused into its norm (one Triton kernel on CUDA)."""

    def __init__(self, size: int, eps: float, dtype, device=None):
        super().__init__()
        self.eps = eps
        self.weight = _new_param((size,), dtype, device, default_weight_loader)
        self.weight.data.fill_(1.0)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if elementwise.is_available(x.device):
            out, residual_out = elementwise.rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual_out)
        if residual is not None:
            x = x + residual
            residual = x
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x32.to(x.dtype)
        return out if residual is None else (out, residual)


class SiluAndMul(nn.Module):
    """[N, 2 * I] holding [gate | up] -> silu(gate) * up, [N, I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if elementwise.is_available(x.device):
            return elementwise.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


_SILU_AND_MUL = SiluAndMul()
