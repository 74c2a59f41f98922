"""RequestState.embeds_rows: which embedding rows a step's positions take. A mixed prompt
keeps only its rows (not spread over its whole length), so every chunk boundary must find
the right ones."""

from __future__ import annotations

import torch

from workers.intake import RequestState


def _pieces(state: RequestState, start: int, end: int) -> list[tuple[int, list[float]]]:
    return [(offset, rows[:, 0].tolist()) for offset, rows in state.embeds_rows(start, end)]


def test_an_embeddings_prompt_is_one_piece_up_to_its_end():
    rows = torch.arange(6.0)[:, None].expand(6, 3)
    state = RequestState("e", 6, None, rows)
    assert _pieces(state, 0, 6) == [(0, [0, 1, 2, 3, 4, 5])]
    assert _pieces(state, 4, 9) == [(0, [4, 5])]  # a chunk that runs into the outputs
    assert _pieces(state, 6, 7) == []  # a decode


def test_a_mixed_prompts_spans_are_cut_at_chunk_boundaries():
    # Positions 0-11; rows 10, 11 at positions 2-3, rows 12, 13, 14 at positions 7-9.
    rows = torch.arange(10.0, 15.0)[:, None].expand(5, 3)
    state = RequestState("m", 12, list(range(40, 52)), rows, ((2, 4), (7, 10)))
    assert _pieces(state, 0, 12) == [(2, [10, 11]), (7, [12, 13, 14])]
    assert _pieces(state, 0, 8) == [(2, [10, 11]), (7, [12])]
    assert _pieces(state, 3, 9) == [(0, [11]), (4, [12, 13])]
    assert _pieces(state, 8, 13) == [(0, [13, 14])]
    assert _pieces(state, 4, 7) == []  # token ids only
    assert _pieces(state, 12, 13) == []


def test_a_prompt_of_token_ids_has_no_rows():
    assert RequestState("i", 4, [1, 2, 3, 4], None).embeds_rows(0, 4) == []
