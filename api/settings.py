"""ServerSettings: what `shardserve serve` flags and a Serve config's `args:` set, frozen
and validated; the engine's part becomes EngineArgs. Runs on the CLI and in replicas."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from api.admission import DEFAULT_MAX_WAITING_REQUESTS
from api.serving import DEFAULT_MAX_EMBEDS_BYTES
from api.routes import DEFAULT_MAX_BODY_BYTES
from cluster.engine_args import EngineArgs
from cluster.engine_client import DEFAULT_STEP_TIMEOUT_S

DEFAULT_MODEL_NAME = "shardserve-tiny-llama"


@dataclass(frozen=True)
class ServerSettings:
    model: str | None = None  # None: the built-in default model
    served_model_name: str | list[str] | None = None  # one name, or aliases (the first is primary)
    tensor_parallel_size: int = 1
    enable_prompt_embeds: bool = False
    max_model_len: int | None = None
    dtype: str = "auto"
    load_format: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    device: str = "auto"
    placement_strategy: str = "STRICT_PACK"
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False  # no CUDA-graph capture of decode steps
    async_scheduling: bool = True  # plan the next decode step while this one runs
    enable_prefix_caching: bool = True  # reuse the K/V of a prompt's cached prefix
    enable_prompt_tokens_details: bool = False  # usage.prompt_tokens_details.cached_tokens
    disable_custom_all_reduce: bool = False  # NCCL only, no one-shot all-reduce
    seed: int = 0
    num_replicas: int = 1
    # API servers (Serve replicas of the ingress) per engine, each its own process and event
    # loop; above 1 the engines run in a deployment of their own that the API servers attach to.
    api_server_count: int = 1
    api_key: str | None = None
    max_prompt_embeds_bytes: int = DEFAULT_MAX_EMBEDS_BYTES
    max_request_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS  # past max_num_seqs; then 503
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S  # the watchdog: a longer step kills the engine
    graceful_shutdown_timeout_s: float = 30.0  # in-flight requests' time to finish at shutdown

    def __post_init__(self) -> None:
        for name in ("num_replicas", "api_server_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        for name in ("step_timeout_s", "graceful_shutdown_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        for name in ("max_prompt_embeds_bytes", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        names = self.served_model_name
        if names is not None and not isinstance(names, str) and not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"served_model_name must be a name or a list of non-empty names, got {names!r}")

    @classmethod
    def from_dict(cls, args: dict) -> "ServerSettings":
        """From a Serve config's `args:`; an unknown key is a ValueError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**args)

    def engine_args(self) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(EngineArgs)}
        return EngineArgs(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    @property
    def max_in_flight(self) -> int:
        """Choices an API server admits at once: its share of a full batch plus the waiting
        queue (the whole of them with one API server per engine)."""
        return -(-(self.max_num_seqs + self.max_waiting_requests) // self.api_server_count)

    def model_name(self) -> str:
        """The primary name: in responses to requests that name no model, and in logs."""
        return self.model_names()[0]

    def model_names(self) -> list[str]:
        """Every name requests may use (vLLM's --served-model-name A B), the primary first."""
        if isinstance(self.served_model_name, str) and self.served_model_name:
            return [self.served_model_name]
        if self.served_model_name:
            return list(self.served_model_name)
        return [str(Path(self.model)) if self.model else DEFAULT_MODEL_NAME]
