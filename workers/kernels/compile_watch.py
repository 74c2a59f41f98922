"""Triton kernels compiled after the engine began serving.

A Triton kernel compiles at its first launch with a new specialization: another constexpr
value, dtype, integer argument that newly equals 1 or is no multiple of 16, or pointer
alignment. The engine launches what its steps need while it starts (capturing the CUDA
graphs runs each captured step once). A kernel that first compiles later, in a step of a
shape the start-up did not run, stalls that step and every request in it until the compile
ends; after a fresh install, Triton's on-disk cache is empty too. This watch logs each such
compile with the kernel and its specialization, and counts them (EngineStats.
num_kernel_compiles; `shardserve_engine_kernel_compiles_total` on /metrics), so that a
stall in the latencies can be traced to the step shape that caused it.
SHARDSERVE_WATCH_COMPILES=0 leaves Triton's hooks alone (with a hook set, Triton also
serializes each compile's specialization, which it otherwise skips)."""

from __future__ import annotations

import collections
import logging
import os
import threading
import time

logger = logging.getLogger(__name__)
ENABLED = os.environ.get("SHARDSERVE_WATCH_COMPILES", "1") != "0"


class CompileWatch:
    """Chained onto Triton's process-wide JIT hooks by install(); counts and logs the
    compiles that end after serving() was called (the ones before are the start-up's)."""

    def __init__(self) -> None:
        self.num_compiles = 0  # since serving()
        self.recent: collections.deque[str] = collections.deque(maxlen=32)  # "kernel: specialization"
        self._serving = False
        self._started: dict[object, float] = {}  # compile key -> when its cache miss was seen
        self._lock = threading.Lock()

    def install(self) -> bool:
        """Adds this watch to Triton's hooks before and after a compile, keeping any hooks
        already set (called in turn, their answers returned). False where this Triton
        has no such hooks, or SHARDSERVE_WATCH_COMPILES=0."""
        if not ENABLED:
            return False
        try:
            from triton import knobs
        except ImportError:
            return False
        runtime = getattr(knobs, "runtime", None)
        if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
            return False
        before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook

        def cache_miss(**info):
            self.compile_started(info)
            return before(**info) if before is not None else None

        def compiled(**info):
            self.compile_ended(info)
            return after(**info) if after is not None else None

        runtime.jit_cache_hook, runtime.jit_post_compile_hook = cache_miss, compiled
        return True

    def serving(self) -> None:
        """From now on, each compile is counted and logged."""
        self._serving = True

    def compile_started(self, info: dict) -> None:
        """Triton's jit_cache_hook arguments: a kernel is about to compile."""
        with self._lock:
            self._started[info["key"]] = time.monotonic()

    def compile_ended(self, info: dict) -> None:
        """Triton's jit_post_compile_hook arguments: the kernel has compiled (or loaded
        from Triton's on-disk cache)."""
        with self._lock:
            started = self._started.pop(info["key"], None)
            if not self._serving:
                return
            self.num_compiles += 1
        took = "" if started is None else f" in {(time.monotonic() - started) * 1e3:.0f} ms"
        name, specialization = _name(info), info.get("repr", "?")
        self.recent.append(f"{name}: {specialization}")
        logger.warning(
            "Triton compiled %s%s while serving; the step waited for it. The engine's start-up "
            "ran no step of this shape. Specialization: %s", name, took, specialization)


def _name(info: dict) -> str:
    fn = info.get("fn")
    name = getattr(fn, "name", None)
    module = getattr(fn, "module", None)
    if name is None:
        return "a Triton kernel"
    return f"{module}.{name}" if module else name
