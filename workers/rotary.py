"""Rotary position embedding with Hugging Face semantics (rotate_half / neox layout) for
rope types default, linear and llama3; one cos/sin table per model. Runs in each shard."""

from __future__ import annotations

import math

import torch
from torch import nn

from workers.kernels import elementwise

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def compute_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict | None, max_position: int) -> torch.Tensor:
    """float32 [head_dim / 2] inverse frequencies, as transformers' ROPE_INIT_FUNCTIONS."""
    rope_type = (rope_scaling or {}).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope_theta**exponents)
    if rope_type == "linear":
        return inv_freq / _param(rope_scaling, "factor")
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling, max_position)
    return inv_freq


def _param(rope_scaling: dict, key: str) -> float:
    if key not in rope_scaling:
        raise ValueError(f"rope_scaling of type {rope_scaling['rope_type']!r} needs {key!r}; got {rope_scaling}")
    return float(rope_scaling[key])


def _llama3_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict, max_position: int) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short kept, the band between blended."""
    factor = _param(rope_scaling, "factor")
    low_freq_factor = _param(rope_scaling, "low_freq_factor")
    high_freq_factor = _param(rope_scaling, "high_freq_factor")
    old_context_len = rope_scaling.get("original_max_position_embeddings", max_position)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their positions.

    Holds cos and sin tables [max_position, head_dim / 2] in the model dtype (computed in
    float32 and cast, as HF does per call). forward(positions [N], q [N, h, d], k [N, kvh, d])
    -> rotated (q, k) of the same shapes: new tensors, or on CUDA q and k rotated in place
    by one Triton kernel (their last dim must be contiguous).
    """

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        rope_theta: float,
        rope_scaling: dict | None,
        dtype,
        device=None,
    ):
        super().__init__()
        inv_freq = compute_inv_freq(head_dim, rope_theta, rope_scaling, max_position)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos", freqs.cos().to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("sin", freqs.sin().to(dtype=dtype, device=device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if elementwise.is_available(q.device):
            elementwise.rotary_(positions, q, k, self.cos, self.sin)
            return q, k
        cos = self.cos[positions].unsqueeze(1)  # [N, 1, d/2], broadcast over heads
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), written on the two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
