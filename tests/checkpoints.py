"""Tiny Hugging Face checkpoints of every supported family, saved by transformers itself,
with weights re-initialized so greedy argmax is decisive (logit gaps dwarf float noise)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

FAMILIES = ("llama", "llama-tied", "mistral", "qwen2", "qwen3")

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=301,  # odd: exercises vocab padding at tensor-parallel size 2
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)
# Llama 3.1's RoPE scaling, with an original context short enough to matter at head_dim 16.
_LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)


def _config(family: str, tie_word_embeddings: bool, overrides: dict):
    import transformers

    tie = tie_word_embeddings or family == "llama-tied"
    common = {**_COMMON, **overrides}
    if family in ("llama", "llama-tied"):
        return transformers.LlamaConfig(**common, rope_parameters=dict(_LLAMA3_ROPE), tie_word_embeddings=tie)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=8, tie_word_embeddings=tie)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=tie)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, rope_theta=1e6, tie_word_embeddings=tie)
    raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")


@torch.no_grad()
def _reinitialize(model, seed: int) -> None:
    """Embeddings N(0, 1), linears N(0, 1/fan_in), lm_head 3x that, norms 1 +- 0.25,
    biases N(0, 0.2): activations stay O(1) and logits are spread by several units."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "embed_tokens" in name:
            param.normal_(0.0, 1.0, generator=generator)
        elif "norm" in name:
            param.uniform_(0.75, 1.25, generator=generator)
        elif name.endswith("bias"):
            param.normal_(0.0, 0.2, generator=generator)
        else:
            scale = 3.0 if name.startswith("lm_head") else 1.0
            param.normal_(0.0, scale / math.sqrt(param.shape[1]), generator=generator)


def make_tiny_checkpoint(
    family: str,
    path,
    *,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Builds the HF model class of `family` (llama with llama3 RoPE, llama-tied, mistral
    with sliding_window 8, qwen2, qwen3) from a tiny config and saves it at `path`.
    `config_overrides` replace the tiny config's sizes (e.g. more heads for TP=8)."""
    import transformers

    config = _config(family, tie_word_embeddings, config_overrides)
    torch_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinitialize(torch_model, seed)
    path = Path(path)
    torch_model.to(dtype).save_pretrained(path)
    return path
