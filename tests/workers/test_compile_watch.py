"""The compile watch: Triton kernels compiled after the engine began serving are counted and
logged, with the kernel and its specialization; the start-up's are not. On CPU through
Triton's own hook slots, called as Triton calls them; on a GPU (gpu marker) with a real
kernel compiled for a constexpr value it had not seen."""

from __future__ import annotations

import logging

import pytest
import torch

from workers.kernels.compile_watch import CompileWatch

knobs = pytest.importorskip("triton.knobs", reason="needs Triton's knobs (Triton 3.4 or newer)")


@pytest.fixture
def hooks(monkeypatch):
    """Triton's two JIT hook slots, restored after the test; a hook already set in each."""
    calls = []

    def earlier_cache_hook(**info):
        calls.append(("cache", info["key"]))
        return info["key"] == "skip me"  # True: Triton skips the compile

    def earlier_post_hook(**info):
        calls.append(("post", info["key"]))

    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", earlier_cache_hook)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", earlier_post_hook)
    return calls


class _FnInfo:  # what Triton passes as `fn` (triton.runtime.jit.JitFunctionInfo)
    module = "workers.kernels.paged_attention"
    name = "_paged_decode_kernel"


def compile_once(key: str) -> bool | None:
    """Triton's two calls around one compile, as JITFunction._do_compile makes them."""
    info = dict(key=key, repr=f"_paged_decode_kernel[num_warps=4](NUM_SPLITS: constexpr={key})",
                fn=_FnInfo(), compile={"key": key}, is_manual_warmup=False, already_compiled=False)
    skipped = knobs.runtime.jit_cache_hook(**info)
    knobs.runtime.jit_post_compile_hook(**info)
    return skipped


def test_compiles_after_serving_are_counted_and_logged_and_earlier_hooks_still_run(hooks, caplog):
    watch = CompileWatch()
    assert watch.install()
    compile_once("2")  # start-up: graph capture compiles, not counted
    assert watch.num_compiles == 0
    watch.serving()
    with caplog.at_level(logging.WARNING, logger="workers.kernels.compile_watch"):
        compile_once("3")
    assert watch.num_compiles == 1
    [record] = caplog.records
    message = record.getMessage()
    assert "workers.kernels.paged_attention._paged_decode_kernel" in message
    assert "NUM_SPLITS: constexpr=3" in message and " ms while serving" in message
    assert list(watch.recent) == ["workers.kernels.paged_attention._paged_decode_kernel: "
                                  "_paged_decode_kernel[num_warps=4](NUM_SPLITS: constexpr=3)"]
    # The hooks that were there before run in turn, and the cache hook's answer is theirs.
    assert compile_once("skip me") is True
    assert hooks == [("cache", "2"), ("post", "2"), ("cache", "3"), ("post", "3"),
                     ("cache", "skip me"), ("post", "skip me")]
    assert watch.num_compiles == 2


def test_a_compile_without_its_start_is_still_counted(hooks):
    """A compile whose cache miss was seen before install() (or by another watch)."""
    watch = CompileWatch()
    watch.install()
    watch.serving()
    knobs.runtime.jit_post_compile_hook(key="never started", repr="k[](...)", fn=_FnInfo(),
                                        compile={}, is_manual_warmup=False, already_compiled=False)
    assert watch.num_compiles == 1


@pytest.mark.gpu
def test_a_real_kernel_compiled_for_a_new_constexpr_is_counted(hooks):
    import triton
    import triton.language as tl

    @triton.jit
    def add_constant(x_ptr, n, VALUE: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + VALUE, mask=mask)

    x = torch.zeros(100, device="cuda")
    watch = CompileWatch()
    assert watch.install()
    add_constant[(1,)](x, 100, VALUE=1, BLOCK=128)  # start-up
    watch.serving()
    add_constant[(1,)](x, 100, VALUE=1, BLOCK=128)  # compiled already: nothing
    assert watch.num_compiles == 0
    add_constant[(1,)](x, 100, VALUE=2, BLOCK=128)  # a new specialization
    torch.cuda.synchronize()
    assert watch.num_compiles == 1
    assert torch.equal(x, torch.full_like(x, 4.0))


def test_switched_off_it_leaves_tritons_hooks_alone(hooks, monkeypatch):
    from workers.kernels import compile_watch

    monkeypatch.setattr(compile_watch, "ENABLED", False)
    before = knobs.runtime.jit_cache_hook
    assert not CompileWatch().install()
    assert knobs.runtime.jit_cache_hook is before
