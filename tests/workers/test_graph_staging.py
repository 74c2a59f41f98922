"""The graphs' pinned staging buffers: a set is written again only after the device ran the
copies out of it. The host runs ahead of the device through steps that sample nothing (a
long prompt's prefill chunks), so a set rewritten under a pending copy would hand that
step another step's inputs (seen on CUDA: identical chunked calls diverging by 0.4 in
log-probability). CUDA events are stood in for by a recorder here; the GPU test in
tests/cluster/test_cuda_graphs.py runs the real thing."""

from __future__ import annotations

import torch

from workers import cuda_graphs
from workers.cuda_graphs import Staging


class RecordedEvent:
    log: list = []

    def record(self):
        RecordedEvent.log.append(("record", id(self)))

    def synchronize(self):
        RecordedEvent.log.append(("wait", id(self)))


def test_a_set_is_reused_only_after_the_copies_out_of_it(monkeypatch):
    monkeypatch.setattr(cuda_graphs.torch.cuda, "Event", RecordedEvent)
    RecordedEvent.log = []
    staging = Staging(lambda pinned: torch.zeros(2), torch.device("cuda"))  # only the events touch CUDA
    first = staging.take()
    staging.copies_queued()
    second = staging.take()
    staging.copies_queued()
    assert first is not second
    assert [kind for kind, _ in RecordedEvent.log] == ["record", "record"]  # no wait for a fresh set
    first_event = RecordedEvent.log[0][1]
    RecordedEvent.log = []
    assert staging.take() is first
    assert RecordedEvent.log == [("wait", first_event)]  # before the host writes into it again
    staging.copies_queued()
    assert RecordedEvent.log[-1] == ("record", first_event)  # one event per set, recorded anew


def test_off_cuda_there_is_nothing_to_wait_for():
    staging = Staging(lambda pinned: torch.zeros(2), torch.device("cpu"))
    sets = [staging.take() for _ in range(4)]
    for _ in sets:
        staging.copies_queued()
    assert sets[0] is sets[2] and sets[1] is sets[3] and sets[0] is not sets[1]
