"""Which rows of a step predict a prompt token of a request that asked for prompt
logprobs: pure Python on hand-made request mirrors and step plans (every rank computes the
same rows, so they must follow from the plan alone)."""

from __future__ import annotations

from workers.intake import RequestState
from workers.messages import ScheduledRequest
from workers.prompt_logprobs import PromptRows, prompt_logprob_rows


def _state(req_id: str, prompt_len: int, prompt_logprobs: int | None) -> RequestState:
    return RequestState(req_id, prompt_len, list(range(10, 10 + prompt_len)), None, prompt_logprobs=prompt_logprobs)


def _sched(req_id: str, start: int, rows: int, sampled: bool = False) -> ScheduledRequest:
    return ScheduledRequest(req_id, start, rows, (), sampled)


def test_rows_follow_the_chunks_and_stop_before_the_last_prompt_position():
    scored, plain = _state("a", 10, 2), _state("b", 4, None)
    requests = {"a": scored, "b": plain}
    # A decode row of another request first, then the scored prompt's chunks [0, 4) and [4, 10).
    first = prompt_logprob_rows((_sched("b", 4, 1, True), _sched("a", 0, 4)), requests)
    assert first == [PromptRows(scored, 1, 0, 4)]
    last = prompt_logprob_rows((_sched("a", 4, 6, True),), requests)
    assert last == [PromptRows(scored, 0, 4, 5)]  # row of position 9 predicts the first sample


def test_no_rows_after_the_first_sample_or_for_a_one_token_prompt():
    scored, single = _state("a", 10, 0), _state("c", 1, 3)
    scored.first_sampled = True  # a recompute after a preemption that came after its first sample
    requests = {"a": scored, "c": single}
    assert prompt_logprob_rows((_sched("a", 0, 11), _sched("c", 0, 1, True)), requests) == []
