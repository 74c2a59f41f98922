"""LLM.generate leaves no request running in the engine when it raises: not while
collecting outputs, nor while adding a batch's requests (a failed put of a later prompt's
embeddings, the engine dying, Ctrl-C). A stand-in EngineClient records the calls (no Ray)."""

from __future__ import annotations

import contextlib
import types

import pytest

from cluster.llm import LLM
from cluster.prompts import EnginePrompt
from workers.sampling_params import SamplingParams


class StandInClient:
    """Takes requests until told to fail; records aborts."""

    dead_reason = None

    def __init__(self, fail_at: int):
        self.added, self.aborted, self.fail_at = [], [], fail_at
        self._ids = iter(range(100))

    def next_request_id(self):
        return f"req-{next(self._ids)}"

    def put_prompts(self, prompts):
        return prompts

    def together(self):
        return contextlib.nullcontext()

    def add_request(self, req_id, params, sink, *prompt, **kwargs):
        if len(self.added) == self.fail_at:
            raise KeyboardInterrupt  # or ObjectStoreFullError, EngineDeadError
        self.added.append(req_id)

    def abort(self, req_id):
        self.aborted.append(req_id)


def test_a_failure_while_adding_aborts_the_requests_already_added():
    llm = LLM.__new__(LLM)  # no cluster: only the intake of generate() runs
    llm.tokenizer, llm.engine = None, StandInClient(fail_at=3)
    llm.config = types.SimpleNamespace(max_num_batched_tokens=2048)
    prompts = [EnginePrompt(None, (5, 6, 7), None)] * 3
    params = [SamplingParams(max_tokens=8), SamplingParams(max_tokens=8, n=2), SamplingParams(max_tokens=8)]
    with pytest.raises(KeyboardInterrupt):
        llm._run(zip(prompts, params), len(prompts), use_tqdm=False)
    assert llm.engine.added == ["req-0", "req-1-0", "req-1-1"]
    assert set(llm.engine.added) <= set(llm.engine.aborted)



@pytest.mark.parametrize("share, expected", [
    (0.25, [[4], [8, 4, 4], [4, 4, 4, 4], [4, 4]]),
    (0.5, [[4, 8], [4, 4, 4, 4], [4, 4, 4, 4]]),
    (1.0, [[4, 8, 4], [4, 4, 4, 4], [4, 4, 4]]),
    (0.01, [[4], [8, 4, 4], [4, 4, 4, 4], [4, 4]]),  # at least one token: one prompt
])
def test_the_first_group_is_a_share_of_a_step(monkeypatch, share, expected):
    """step_groups ends the first group once it reaches FIRST_GROUP_SHARE of a step's tokens
    (samples counted), every later one at a whole step's; the last takes what is left."""
    import numpy as np

    import cluster.llm

    monkeypatch.setattr(cluster.llm, "FIRST_GROUP_SHARE", share)
    rows = EnginePrompt(None, None, np.zeros((4, 8), dtype=np.uint16), "bfloat16")
    checked = [(rows, SamplingParams(n=2 if i == 1 else 1)) for i in range(10)]
    groups = cluster.llm.step_groups(iter(checked), 16)
    assert [[prompt.num_tokens * sp.n for prompt, sp in group] for group in groups] == expected
