"""EngineArgs: the user-facing engine settings (LLM(...) keywords and `shardserve serve`
flags), resolved against the model folder into a frozen EngineConfig. Runs on the driver
or a Serve replica."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import ray

from cluster.default_model import default_model_path, model_shape_path, shape_names
from cluster.tokenizer import load_tokenizer
from workers.config import EngineConfig, ModelConfig, parse_dtype

logger = logging.getLogger(__name__)

DEFAULT_MAX_STEP_TOKENS = {"cuda": 8192, "cpu": 2048}  # the default step budget's ceiling


@dataclass(frozen=True)
class EngineArgs:
    model: str | None = None  # a Hugging Face model folder; None: the built-in default
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    load_format: str = "auto"
    max_model_len: int | None = None
    enable_prompt_embeds: bool = False
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    placement_strategy: str = "STRICT_PACK"
    enforce_eager: bool = False  # as in vLLM: skip CUDA-graph capture of decode steps
    async_scheduling: bool = True  # as in vLLM: plan the next decode step while this one runs
    enable_prefix_caching: bool = True  # as in vLLM: reuse the K/V of a prompt's cached prefix
    disable_custom_all_reduce: bool = False  # as in vLLM: NCCL only (no one-shot all-reduce)

    def resolve(self):
        """(EngineConfig, tokenizer or None). ValueError for a bad setting."""
        model_dir = self._model_dir()
        if not model_dir.is_dir():
            raise ValueError(
                f"model {str(model_dir)!r} is not a folder; pass a local Hugging Face model "
                "folder (config.json, *.safetensors, tokenizer files), or with load_format "
                f"'dummy' a model shape for random weights: {', '.join(shape_names())}"
            )
        model_config = ModelConfig.from_pretrained(model_dir)
        tokenizer = load_tokenizer(model_dir)
        max_model_len = self.max_model_len or model_config.max_position_embeddings
        if max_model_len > model_config.max_position_embeddings:
            # Positions past the model's RoPE table would read out of bounds (a CUDA error,
            # or silently wrong outputs) when a long request got there, not here.
            raise ValueError(
                f"max_model_len ({max_model_len}) is greater than the model's "
                f"max_position_embeddings ({model_config.max_position_embeddings}); pass "
                f"--max-model-len {model_config.max_position_embeddings} or less"
            )
        device = self._resolve_device()
        config = EngineConfig(
            model=str(model_dir),
            model_config=model_config,
            tensor_parallel_size=self.tensor_parallel_size,
            dtype=self._resolve_dtype(model_config),
            load_format=self.load_format,
            device=device,
            max_model_len=max_model_len,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens or default_step_tokens(device, max_model_len),
            enable_prompt_embeds=self.enable_prompt_embeds,
            seed=self.seed,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            gpu_memory_utilization=self.gpu_memory_utilization,
            placement_strategy=self.placement_strategy,
            enforce_eager=self.enforce_eager,
            async_scheduling=self.async_scheduling,
            enable_prefix_caching=self.enable_prefix_caching,
            disable_custom_all_reduce=self.disable_custom_all_reduce,
            eos_token_ids=_eos_token_ids(model_config, tokenizer),
        )
        return config, tokenizer

    def _resolve_dtype(self, model_config: ModelConfig) -> str:
        if self.dtype != "auto":
            parse_dtype(self.dtype)
            return self.dtype
        name = model_config.torch_dtype
        return "float32" if name in ("float", "float32") else str(parse_dtype(name)).removeprefix("torch.")

    def _model_dir(self) -> Path:
        """The model folder: `model`, the built-in default when none, or, for a shipped
        shape's name with load_format "dummy" (random weights of the real shapes, as for
        benchmarks), that shape's config folder."""
        if not self.model:
            return default_model_path()
        path = Path(self.model)
        if not path.is_dir() and self.load_format == "dummy" and self.model in shape_names():
            return model_shape_path(self.model)
        return path

    def _resolve_device(self) -> str:
        return resolve_device(self.device, self.tensor_parallel_size)


def resolve_device(device: str, tensor_parallel_size: int) -> str:
    """"auto" -> "cuda" when the Ray cluster this process joined has a GPU for every shard,
    else "cpu" (with a warning if it has some GPUs: an engine it cannot place on them would
    otherwise wait for GPUs that may never come); any other value as it is."""
    if device != "auto":
        return device
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if gpus >= tensor_parallel_size:
        return "cuda"
    if gpus:
        logger.warning("device auto: the Ray cluster has %g GPU(s), fewer than tensor_parallel_size=%d, so the "
                       "engine runs on CPU; pass device='cuda' (--device cuda) to wait for GPUs instead",
                       gpus, tensor_parallel_size)
    return "cpu"


def default_step_tokens(device: str, max_model_len: int) -> int:
    """Tokens a step may hold unless max_num_batched_tokens says: the context length, at
    least 2048, at most 8192 on a GPU (vLLM's chunked-prefill default for its server) and
    2048 on CPU. A longer prompt is prefilled in chunks between decode steps, so it neither
    stalls the running requests for its whole prefill nor holds a whole context's
    activations at once."""
    return min(max(max_model_len, 2048), DEFAULT_MAX_STEP_TOKENS[device])


def _eos_token_ids(model_config: ModelConfig, tokenizer) -> tuple[int, ...]:
    ids = list(model_config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return tuple(ids)
