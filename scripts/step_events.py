"""Timing events for the profiling scripts: CUDA events on a GPU, and on CPU the same
interface on host clocks, so one script's arithmetic serves both. LeaderSteps and
print_steps time rank 0's steps one by one (probe_first_token.py and bench_offline.py
--steps)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


class HostEvent:
    """torch.cuda.Event's timing interface on host clocks (CPU runs)."""

    def __init__(self) -> None:
        self.time = 0.0

    def record(self) -> None:
        self.time = time.perf_counter()

    def elapsed_time(self, end: "HostEvent") -> float:
        return (end.time - self.time) * 1e3


def new_event(cuda: bool):
    """An event to record(): a timing CUDA event, or a HostEvent off CUDA."""
    return torch.cuda.Event(enable_timing=True) if cuda else HostEvent()


def _install_step_events(shard) -> bool:
    """On the shard: each execute() call's rows, its host enter and exit (time.time(): one
    clock for every process of a host) and events recorded around it on its device, kept
    in shard._steps."""
    cuda = shard.runner.device.type == "cuda"
    steps = shard._steps = []
    execute = shard.runner.execute

    def timed(scheduled):
        start, end = new_event(cuda), new_event(cuda)
        enter = time.time()
        start.record()
        try:
            return execute(scheduled)
        finally:
            end.record()
            steps.append((sum(s.num_new_tokens for s in scheduled), enter, time.time(), start, end))
    shard.runner.execute = timed
    return True


def _take_steps(shard) -> list:
    """[(rows, host enter, host exit, device ms)] of the shard's steps since the last take."""
    if shard.runner.device.type == "cuda":
        torch.cuda.synchronize(shard.runner.device)
    steps, shard._steps[:] = list(shard._steps), []
    return [(rows, enter, exit_, start.elapsed_time(end)) for rows, enter, exit_, start, end in steps]


def began_after(steps: list, start: float) -> list:
    """The steps (as _take_steps gives them) that began after start (a time.time())."""
    return [step for step in steps if step[1] >= start]


def step_rows(steps: list, start: float) -> list:
    """(rows, host ms, device ms, period ms to the next step's start; None for the last) of
    each step that began after start (a time.time())."""
    return _with_periods(began_after(steps, start))


def _with_periods(steps: list) -> list:
    """step_rows() of steps already taken for a call."""
    return [(rows, (exit_ - enter) * 1e3, device_ms,
             (steps[i + 1][1] - enter) * 1e3 if i + 1 < len(steps) else None)
            for i, (rows, enter, exit_, device_ms) in enumerate(steps)]


class LeaderSteps:
    """Rank 0's steps of an engine (an LLM), one by one: the rows each computed, the host's
    time in the runner's execute(), the device's time between events recorded around it,
    and the period from its start to the next step's."""

    def __init__(self, llm) -> None:
        import ray

        self._ray = ray
        self._leader = llm.engine.shards[0]
        ray.get(self._leader.__ray_call__.remote(_install_step_events))

    def take(self, start: float, end: float | None = None) -> CallSteps:
        """The steps that began after start (a time.time(): the call's), taken from the
        shard; end: when the call returned."""
        taken = began_after(self._ray.get(self._leader.__ray_call__.remote(_take_steps)), start)
        return CallSteps(_with_periods(taken), (taken[0][1] - start) * 1e3 if taken else None,
                         (end - start) * 1e3 if end is not None else None)


@dataclass
class CallSteps:
    """A call's steps on rank 0 (step_rows()), when the first began after the call (ms),
    and the call's own time (ms; None when not given)."""

    steps: list
    lead_ms: float | None
    call_ms: float | None = None

    @property
    def after_ms(self) -> float | None:
        """The call's time after its last step: the call's, less the lead, the periods
        (which chain the steps' starts) and the last step's device time."""
        if self.call_ms is None or not self.steps:
            return None
        return self.call_ms - self.lead_ms - sum(step[3] or 0.0 for step in self.steps) - self.steps[-1][2]


def print_steps(calls_by_mode: dict) -> None:
    """calls_by_mode: kind -> list over calls of CallSteps; per step index, the median of the
    calls that have that step, each kind in its columns, and the columns' sums; then the
    median call's time, when its first step began, and its time after the last step."""
    runs_by_mode = {mode: [call.steps for call in calls] for mode, calls in calls_by_mode.items()}
    print("rank 0's steps, median of runs: rows, host ms in execute, device ms, period ms to the next step")
    modes = list(runs_by_mode)
    print(f"{'step':>4}" + "".join(f"{mode:>36}" for mode in modes))
    totals = {mode: [0.0, 0.0, 0.0] for mode in modes}
    for index in range(max((len(run) for runs in runs_by_mode.values() for run in runs), default=0)):
        cells = []
        for mode in modes:
            steps = [run[index] for run in runs_by_mode[mode] if index < len(run)]
            if not steps:
                cells.append(f"{'-':>36}")
                continue
            rows, host, device = (statistics.median(step[k] for step in steps) for k in range(3))
            periods = [step[3] for step in steps if step[3] is not None]
            period = statistics.median(periods) if periods else None
            for k, value in enumerate((host, device, period or 0.0)):
                totals[mode][k] += value
            cells.append(f"{rows:7g} {host:8.2f} {device:8.2f} " + (f"{period:9.2f}" if period else f"{'-':>9}"))
        print(f"{index:>4}" + "".join(f"{cell:>36}" for cell in cells))
    print(f"{'sum':>4}" + "".join(f"{'':7} {host:8.2f} {device:8.2f} {period:9.2f}".rjust(36)
                                  for host, device, period in totals.values()))

    def median_of(calls, name) -> str:
        values = [getattr(call, name) for call in calls if getattr(call, name) is not None]
        return f"{statistics.median(values):.2f}" if values else "-"
    for mode, calls in calls_by_mode.items():
        print(f"{mode}: call {median_of(calls, 'call_ms')} ms, first step began at {median_of(calls, 'lead_ms')} ms, "
              f"the call returned {median_of(calls, 'after_ms')} ms after the last step (medians)")
