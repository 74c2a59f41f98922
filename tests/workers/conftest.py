"""Helpers for the shard-side tests: safetensors slices of in-memory tensors, and running
a function on a gloo process group of several local processes (no Ray)."""

from __future__ import annotations

import io
import multiprocessing
import os
import queue
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from safetensors import safe_open
from safetensors.torch import save_file

from workers.parallel import bind_store, init_process_group

DISTRIBUTED_TIMEOUT_S = 120


@pytest.fixture
def as_slices(tmp_path):
    """tensors {name: Tensor} -> {name: safetensors slice}, as the loader hands them over."""
    handles = []

    def convert(tensors: dict[str, torch.Tensor]) -> dict:
        path = tmp_path / f"weights{len(handles)}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        handle = safe_open(str(path), framework="pt", device="cpu")
        handles.append(handle)
        return {name: handle.get_slice(name) for name in tensors}

    return convert


def _to_bytes(obj) -> bytes:
    # Tensors go through a queue as bytes: torch's shared-memory pickling needs the
    # sender alive until the receiver reads, and the sender exits right after.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _entry(fn, rank: int, world_size: int, device: str, ports, results, args) -> None:
    try:
        torch.set_num_threads(1)
        if device == "cuda":
            torch.cuda.set_device(rank)
        store = None
        if rank == 0:
            store = bind_store("127.0.0.1", world_size, timeout_s=DISTRIBUTED_TIMEOUT_S)
            for _ in range(world_size - 1):
                ports.put(store.port)
            port = store.port
        else:
            port = ports.get(timeout=DISTRIBUTED_TIMEOUT_S)
        pg = init_process_group(rank, world_size, "127.0.0.1", port, device, DISTRIBUTED_TIMEOUT_S, store)
        results.put((rank, None, _to_bytes(fn(pg, *args))))
        torch.distributed.destroy_process_group()
    except BaseException:
        results.put((rank, traceback.format_exc(), None))


def _collect(procs, results, by_rank: dict, errors: list) -> None:
    """Waits for every rank's result; stops at the first error or a rank that died."""
    deadline = time.monotonic() + DISTRIBUTED_TIMEOUT_S
    while len(by_rank) < len(procs) and not errors:
        try:
            rank, error, payload = results.get(timeout=0.5)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                errors.append(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} before reporting")
            elif time.monotonic() > deadline:
                errors.append(f"no result within {DISTRIBUTED_TIMEOUT_S} s")
            continue
        if error:
            errors.append(f"rank {rank}:\n{error}")
        else:
            by_rank[rank] = torch.load(io.BytesIO(payload), weights_only=False)


def skip_unless_gpus(count: int) -> None:
    """Skips the test, with the reason shown, on a machine of fewer than `count` GPUs."""
    if torch.cuda.device_count() < count:
        pytest.skip(f"needs {count} GPUs, this machine has {torch.cuda.device_count()}")


def run_distributed(fn, world_size: int, *args, device: str = "cpu") -> list:
    """fn(pg, *args) on `world_size` spawned processes, a gloo group on CPU or, with
    device="cuda", NCCL with rank r on GPU r; returns each rank's result."""
    ctx = multiprocessing.get_context("spawn")
    ports, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, device, ports, results, args))
             for r in range(world_size)]
    for p in procs:
        p.start()
    by_rank, errors = {}, []
    try:
        _collect(procs, results, by_rank, errors)
    finally:
        for p in procs:
            p.join(timeout=5 if errors else DISTRIBUTED_TIMEOUT_S)
            if p.is_alive():
                p.kill()
    if errors:
        pytest.fail("\n".join(errors))
    return [by_rank[r] for r in range(world_size)]


# Script pieces for run_in_triton_interpreter. KERNELS_ON: the CUDA kernels' paths taken on
# CPU, where the interpreter runs them. ON_TWO_FORKED_RANKS: on_two_forked_ranks(fn), fn(pg)
# on two forked processes over gloo (a `python -c` script has no file that spawned
# processes could import), {rank: what fn returned}.
KERNELS_ON = """
from workers.kernels import elementwise, paged_attention, paged_prefill
elementwise.is_available = lambda device: True
paged_attention.is_available = lambda device, head_dim, block_size: True
paged_prefill.is_available = lambda device, head_dim, block_size: True
"""

ON_TWO_FORKED_RANKS = """
import multiprocessing
import torch
from workers.parallel import bind_store, init_process_group


def on_two_forked_ranks(fn):
    def rank_main(rank, ports, results):
        torch.set_num_threads(1)
        store = bind_store("127.0.0.1", 2, 60) if rank == 0 else None
        if store is not None:
            ports.put(store.port)
        port = store.port if store is not None else ports.get(timeout=60)
        pg = init_process_group(rank, 2, "127.0.0.1", port, "cpu", 60, store)
        results.put((rank, fn(pg)))

    ctx = multiprocessing.get_context("fork")
    ports, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(rank, ports, results)) for rank in range(2)]
    for p in procs:
        p.start()
    by_rank = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return by_rank
"""


# Triton's CPU interpreter before 3.9 makes a loop bound loaded from memory an int with int()
# of a one-element array, which numpy refuses since 2.4 ("only 0-dimensional arrays can be
# converted to Python scalars"); 3.9 squeezes the array first.
INTERPRETER_SQUEEZES_BOUNDS = Version("3.9")


def _interpreter_unsupported(triton_version: str) -> str | None:
    """Why Triton's interpreter cannot run the kernels here, or None."""
    import numpy as np

    if Version(triton_version) >= INTERPRETER_SQUEEZES_BOUNDS:
        return None
    try:
        int(np.ones(1))
    except TypeError:
        return (f"Triton {triton_version}'s interpreter turns a loop bound into an int with int() of a "
                f"one-element array, which numpy {np.__version__} refuses (Triton {INTERPRETER_SQUEEZES_BOUNDS} "
                "squeezes it first); the kernels' GPU tests still run")
    return None


# Prepended to each run_in_triton_interpreter script. Triton's interpreter (3.9) patches the
# triton.language modules a kernel's globals name for each launch, and restores them after.
# It patches again for every call of a @triton.jit function inside the kernel (ours, and
# triton.language's own: tl.sum, tl.zeros, ...), and never restores those patches. Each
# repatch walks the modules with inspect.getmembers, about 2 ms: 18,516 such calls in the
# padded-prefill script's 312 launches (llama alone: 37.5 s, 25.7 s without them). Here a call
# inside a launch patches only modules that this launch has not patched yet. A launch is
# patched and restored as before. With another Triton, whose interpreter lacks these
# internals, the script runs on Triton's own patching.
# The prelude also turns off the interpreter's check of each 32-bit integer add, sub and mul
# for overflow (it redoes each in 64 bits; that script then took 19.3 s). The tests' indices
# are tiny, so it could not fire, and compiled kernels wrap as numpy's int32 then does.
INTERPRETER_PRELUDE = """
def _interpret_faster():
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        patch_lang, Scope = interpreter._patch_lang, interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return
    launches = []  # the language modules patched since the launch in progress began
    by_globals = {}

    def languages(fn):
        key = id(fn.__globals__)  # a module's functions share its globals
        if key not in by_globals:
            by_globals[key] = {id(value) for value in fn.__globals__.values() if value is tl or value is tl.core}
        return by_globals[key]

    def patch_once(fn):
        if launches:  # a function called by the kernel being launched
            if languages(fn) <= launches[-1]:
                return Scope()
            launches[-1] |= languages(fn)
            return patch_lang(fn)
        scope = patch_lang(fn)
        launches.append(set(languages(fn)))
        restore = scope.restore

        def restore_after_launch():
            launches.pop()
            restore()

        scope.restore = restore_after_launch
        return scope

    interpreter._patch_lang = patch_once
    builder = getattr(interpreter, "interpreter_builder", None)
    if builder is not None and hasattr(builder.options, "sanitize_overflow"):
        import dataclasses

        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


_interpret_faster()
"""


def run_in_triton_interpreter(script: str, *argv: str, timeout_s: float = 600) -> None:
    """Runs `script` (which prints "checked" at its end) in a fresh process under
    Triton's CPU interpreter, chosen before any kernel is decorated; fails with its stderr."""
    triton = pytest.importorskip("triton", reason="Triton is not installed (CPU-only install)")
    reason = _interpreter_unsupported(triton.__version__)
    if reason is not None:
        pytest.skip(reason)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", INTERPRETER_PRELUDE + script, *argv], env=env, cwd=root,
                            capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0 and "checked" in result.stdout, result.stderr[-3000:]
