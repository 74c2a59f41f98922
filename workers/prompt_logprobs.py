"""Log-probabilities of a prompt's own tokens (SamplingParams.prompt_logprobs): which rows
of a step predict a prompt token, and their log-probability, rank and top-k. Runs in each
shard: every rank computes the rows' logits (the LM head gathers across ranks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.intake import RequestState
from workers.messages import PromptLogprobs, ScheduledRequest
from workers.transfer import to_device

# Prompt rows whose logits are computed at once: 512 x a 128K vocab of float32 is 256 MB.
ROWS_AT_ONCE = 512


@dataclass(frozen=True)
class PromptRows:
    """A request's rows in a step that predict its prompt tokens first_position + 1, ..."""

    state: RequestState
    first_row: int  # in the step's rows
    first_position: int
    num_rows: int


def prompt_logprob_rows(scheduled: tuple[ScheduledRequest, ...],
                        requests: dict[str, RequestState]) -> list[PromptRows]:
    """Each request that asked for prompt logprobs, with this step's rows that predict one
    of its prompt tokens. Only until its first sample: a recompute after a later
    preemption has none; one after an earlier preemption repeats rows, and the leader
    keeps the first copy (Request.add_prompt_logprobs). Every rank finds the same rows."""
    found, row = [], 0
    for sched in scheduled:
        state = requests[sched.req_id]
        start = sched.num_computed_tokens
        end = min(start + sched.num_new_tokens, state.prompt_len - 1)
        if state.prompt_logprobs is not None and not state.first_sampled and start < end:
            found.append(PromptRows(state, row, start, end - start))
        row += sched.num_new_tokens
    return found


def compute_prompt_logprobs(model, hidden: torch.Tensor, found: list[PromptRows],
                            is_leader: bool) -> dict[str, PromptLogprobs]:
    """hidden: [step rows, hidden size]. Every rank computes the rows' logits,
    ROWS_AT_ONCE at a time; the leader returns, per request, each target token's
    log-probability under the raw model distribution, its rank and the top-k (followers,
    {}). Reading them back waits for the device: only steps with such rows pay it."""
    out = {}
    for rows in found:
        state = rows.state
        targets = None  # the leader's: followers only take part in the LM head's gather
        if is_leader:
            targets = to_device(state.token_ids(rows.first_position + 1, rows.first_position + 1 + rows.num_rows),
                                hidden.device, torch.long)
        logprobs_of, ranks, top = [], [], []
        for start in range(0, rows.num_rows, ROWS_AT_ONCE):
            piece = slice(start, min(start + ROWS_AT_ONCE, rows.num_rows))
            logits = model.compute_logits(hidden[rows.first_row + piece.start : rows.first_row + piece.stop])
            if not is_leader:
                continue
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # [rows, vocab]
            target = logprobs.gather(1, targets[piece, None])  # [rows, 1]
            logprobs_of += target[:, 0].tolist()
            ranks += ((logprobs > target).sum(dim=-1) + 1).tolist()
            if state.prompt_logprobs:
                values, ids = logprobs.topk(state.prompt_logprobs, dim=-1)
                top += [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
            else:
                top += [()] * (piece.stop - piece.start)
        if is_leader:
            out[state.req_id] = PromptLogprobs(rows.first_position, tuple(logprobs_of), tuple(ranks), tuple(top))
    return out
