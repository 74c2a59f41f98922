"""Timing events for the profiling scripts: CUDA events on a GPU, and on CPU the same
interface on host clocks, so one script's arithmetic serves both."""

from __future__ import annotations

import time

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
