"""Frozen configuration: the model's architecture (read from a Hugging Face config.json)
and the engine's settings. Built on the driver, shipped to every shard unchanged."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16' -> torch.bfloat16; ValueError naming the choices otherwise."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(
            f"dtype must be one of auto, float32, bfloat16, float16; got {name!r}"
        ) from None


@dataclass(frozen=True)
class ModelConfig:
    """What the model code needs from config.json, with family defaults resolved."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    sliding_window: int | None = None
    hidden_act: str = "silu"
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {self.hidden_act!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        architectures = raw.get("architectures") or ["LlamaForCausalLM"]
        architecture = architectures[0]
        num_heads = raw["num_attention_heads"]
        rope = _rope_parameters(raw)
        return cls(
            architecture=architecture,
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            vocab_size=raw["vocab_size"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.pop("rope_theta", 10000.0)),
            rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=_attention_bias(architecture, raw),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
            sliding_window=_sliding_window(architecture, raw),
            hidden_act=raw.get("hidden_act", "silu"),
            torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_ids(raw.get("eos_token_id")),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        """Reads config.json, and generation_config.json's eos_token_id when present."""
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{model_dir} is not a model folder: no config.json in it")
        raw = json.loads(config_path.read_text())
        generation_path = model_dir / "generation_config.json"
        if generation_path.is_file():
            generation = json.loads(generation_path.read_text())
            if generation.get("eos_token_id") is not None:
                raw = {**raw, "eos_token_id": generation["eos_token_id"]}
        return cls.from_dict(raw)


def _rope_parameters(raw: dict) -> dict:
    """Transformers 5 writes `rope_parameters` (theta inside); older files write
    `rope_theta` beside an optional `rope_scaling`. Returns one flat dict."""
    if raw.get("rope_parameters"):
        rope = dict(raw["rope_parameters"])
    else:
        rope = dict(raw.get("rope_scaling") or {})
        rope["rope_theta"] = raw.get("rope_theta", 10000.0)
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_type", "default")
    return rope


def _attention_bias(architecture: str, raw: dict) -> bool:
    if architecture == "Qwen2ForCausalLM":
        return True
    return bool(raw.get("attention_bias", False))


def _sliding_window(architecture: str, raw: dict) -> int | None:
    if architecture.startswith("Qwen") and not raw.get("use_sliding_window", False):
        return None
    return raw.get("sliding_window")


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the shards need to build and run one tensor-parallel engine."""

    model: str  # path of a Hugging Face model folder
    model_config: ModelConfig
    tensor_parallel_size: int = 1
    dtype: str = "float32"  # resolved: float32 | bfloat16 | float16
    load_format: str = "auto"  # auto | safetensors | dummy
    device: str = "cpu"  # cpu | cuda
    max_model_len: int = 2048
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prompt_embeds: bool = False
    seed: int = 0
    kv_cache_memory_bytes: int | None = None  # None: 512 MiB on CPU, measured on GPU
    gpu_memory_utilization: float = 0.9
    placement_strategy: str = "STRICT_PACK"
    enforce_eager: bool = False  # True: no CUDA-graph capture (decode steps, one request's prefill)
    async_scheduling: bool = True  # plan the next decode step while this one runs
    enable_prefix_caching: bool = True  # reuse computed full KV blocks by content
    disable_custom_all_reduce: bool = False  # True: NCCL only, no one-shot all-reduce
    eos_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        _check_divisible(self.model_config, self.tensor_parallel_size)
        parse_dtype(self.dtype)
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(
                f"load_format must be one of auto, safetensors, dummy; got {self.load_format!r}"
            )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.placement_strategy not in ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"):
            raise ValueError(
                "placement_strategy must be one of STRICT_PACK, PACK, SPREAD, STRICT_SPREAD; "
                f"got {self.placement_strategy!r}"
            )
        for name in ("max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)


def _check_divisible(model: ModelConfig, tp: int) -> None:
    """Heads split evenly; KV heads split, or replicated when tp > num_key_value_heads."""
    if model.num_attention_heads % tp:
        raise ValueError(
            f"num_attention_heads ({model.num_attention_heads}) must be divisible by "
            f"tensor_parallel_size ({tp})"
        )
    kv = model.num_key_value_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ValueError(
            f"num_key_value_heads ({kv}) and tensor_parallel_size ({tp}) must divide one another"
        )
