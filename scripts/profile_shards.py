"""Where a shard's host time goes, per rank: the step loop's methods on the live shard
actors are wrapped with timers (through Ray's `__ray_call__`), then one prompt decodes.
Prints each rank's mean time and count per phase, largest first. A long "wait for plan"
(broadcast_object on a follower) or "results(wait)" on the leader tells which side bounds
the step. Device events around each step give its span on the GPU and the period between
steps: a span close to the period means the GPU bounds the step, a shorter one the host.

    python scripts/profile_shards.py --model-shape llama-3.1-8b --load-format dummy --dtype bfloat16 -tp 2

Without --model-shape / --model it runs the built-in default model (CPU works)."""

from __future__ import annotations

import argparse
import statistics
import time

import ray

from cluster import LLM, SamplingParams
from scripts.bench_args import UNCACHED, add_model_args, init_ray, model_path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=1024)
    return parser.parse_args(argv)


def _install_timers(shard) -> bool:
    """On the shard: wraps the step's phases with timers kept in shard._phase_times."""
    import collections
    import functools
    import time as clock

    import workers.sampler as sampler_module
    from scripts.step_events import new_event

    totals, counts = collections.defaultdict(float), collections.Counter()
    shard._phase_times = (totals, counts)
    if shard.leader is None:
        _wait_in_broadcast_object()

    def timed(fn, key):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = clock.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[key] += clock.perf_counter() - start
                counts[key] += 1
        return wrapper

    def wrap(obj, name, key=None):
        setattr(obj, name, timed(getattr(obj, name), key or name))

    runner = shard.runner
    # Device events around each execute: its span on the GPU, and the period between the
    # ends of consecutive steps. A span close to the period: the GPU bounds the step.
    cuda = runner.device.type == "cuda"
    shard._step_events = events = []
    execute = runner.execute

    @functools.wraps(execute)
    def execute_with_events(*args, **kwargs):
        start, end = new_event(cuda), new_event(cuda)
        start.record()
        try:
            return execute(*args, **kwargs)
        finally:
            end.record()
            events.append((start, end))
    runner.execute = execute_with_events
    for name in ("broadcast_object", "broadcast", "gather"):
        wrap(runner.pg, name)
    wrap(runner, "apply")
    wrap(runner, "execute")
    wrap(runner.model, "compute_logits")
    if runner.decode_graphs is not None:
        wrap(runner.decode_graphs, "run", "graph_run")
    if shard.leader is not None:
        leader = shard.leader
        for name in ("_launch", "_launch_ahead", "_complete"):
            wrap(leader, name)
        for name in ("schedule", "schedule_ahead", "update"):
            wrap(leader.scheduler, name)
        wrap(leader.sampler, "launch", "sampler_launch")
        # The leader process's only SampledTokens readers are its step loop's.
        sampler_module.SampledTokens.results = timed(sampler_module.SampledTokens.results, "results(wait)")
    return True


def _wait_in_broadcast_object(timeout_s: float = 10.0) -> None:
    """On a follower: returns once its step loop waits for the next plan. The warm-up's
    output reaches the driver before the follower's loop is back there, and a wait begun
    after the timers went in would count the warm-up's last one as the run's."""
    import sys
    import time as clock

    deadline = clock.monotonic() + timeout_s
    while clock.monotonic() < deadline:
        for frame in sys._current_frames().values():
            while frame is not None:
                if frame.f_code.co_name == "broadcast_object":
                    return
                frame = frame.f_back
        clock.sleep(0.001)
    raise TimeoutError(f"the follower's step loop did not wait for a plan within {timeout_s:g} s")


def _phase_times(shard) -> dict:
    """phase -> (mean seconds, count); plus the device's mean execute span and step period."""
    import torch

    totals, counts = shard._phase_times
    times = {key: (totals[key] / counts[key], counts[key]) for key in totals}
    events = shard._step_events
    if shard.runner.device.type == "cuda":
        torch.cuda.synchronize()
    if len(events) > 1:  # medians: the prefill step is one long outlier
        spans = [start.elapsed_time(end) / 1e3 for start, end in events]
        periods = [a[1].elapsed_time(b[1]) / 1e3 for a, b in zip(events, events[1:])]
        times["device: execute span (median)"] = (statistics.median(spans), len(spans))
        times["device: step period (median)"] = (statistics.median(periods), len(periods))
    return times


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    init_ray()
    llm = LLM(model_path(args), tensor_parallel_size=args.tensor_parallel_size, load_format=args.load_format,
              dtype=args.dtype, max_model_len=args.max_model_len, **UNCACHED)
    try:
        prompt = {"prompt_token_ids": list(range(100, 100 + args.prompt_len))}
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        ray.get([shard.__ray_call__.remote(_install_timers) for shard in llm.engine.shards])
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True),
                     use_tqdm=False)
        wall = time.perf_counter() - start
        ranks = ray.get([shard.__ray_call__.remote(_phase_times) for shard in llm.engine.shards])
    finally:
        llm.shutdown()
    print(f"TP={args.tensor_parallel_size}: {args.max_tokens} tokens in {wall * 1e3:.0f} ms "
          f"({wall / args.max_tokens * 1e3:.3f} ms a token, prefill included)")
    for rank, phases in enumerate(ranks):
        device = {key: value for key, value in phases.items() if key.startswith("device:")}
        host = {key: value for key, value in phases.items() if key not in device}
        ordered = sorted(host.items(), key=lambda item: -item[1][0] * item[1][1])
        print(f"rank {rank}: " + ", ".join(f"{key} {mean * 1e6:.0f} us x{count}" for key, (mean, count) in ordered))
        print(f"rank {rank} " + ", ".join(f"{key} {value * 1e6:.0f} us x{count}"
                                          for key, (value, count) in device.items()))
    return ranks


if __name__ == "__main__":
    main()
