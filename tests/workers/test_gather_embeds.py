"""ModelRunner._gather_embeds, the rows of prompt embeddings a step feeds the model: with
a row mask beside token-id rows, and without one (nor a copy, for one piece) when the
embeddings are every row of the step."""

from __future__ import annotations

import pytest
import torch

from workers.config import EngineConfig, ModelConfig
from workers.model_runner import ModelRunner
from workers.parallel import ProcessGroup


@pytest.fixture(scope="module")
def runner(tiny_checkpoints):
    path = tiny_checkpoints("llama")
    config = EngineConfig(model=str(path), model_config=ModelConfig.from_pretrained(path), max_model_len=64,
                          block_size=4, kv_cache_memory_bytes=1 << 20)
    return ModelRunner(config, ProcessGroup(), torch.device("cpu"))


def _rows(runner, n: int, seed: int) -> torch.Tensor:
    hidden = runner.config.model_config.hidden_size
    return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed))


def test_one_requests_rows_are_the_step_as_they_are(runner):
    rows = _rows(runner, 5, 0)
    embeds, mask = runner._gather_embeds([(0, rows)], 5)
    assert mask is None and embeds is rows


def test_several_requests_rows_are_joined_in_row_order(runner):
    first, second = _rows(runner, 3, 1), _rows(runner, 4, 2)
    embeds, mask = runner._gather_embeds([(0, first), (3, second)], 7)
    assert mask is None
    assert torch.equal(embeds, torch.cat([first, second]))


def test_beside_token_id_rows_a_mask_marks_the_embedding_rows(runner):
    first, second = _rows(runner, 2, 3), _rows(runner, 3, 4)
    # Rows: [first x2][a token id][second x3][a decode]
    embeds, mask = runner._gather_embeds([(0, first), (3, second)], 7)
    assert mask.tolist() == [True, True, False, True, True, True, False]
    assert torch.equal(embeds[:2], first) and torch.equal(embeds[3:6], second)


def test_a_mixed_prompts_rows_sit_among_its_token_id_rows(runner):
    """A prompt of token ids and embeddings gives one piece per span of rows: masked, the
    rows between them read the token embeddings, also when its rows are alone in the step."""
    span_a, span_b = _rows(runner, 2, 5), _rows(runner, 1, 6)
    # Rows: [id][span_a x2][id][span_b][id]
    embeds, mask = runner._gather_embeds([(1, span_a), (4, span_b)], 6)
    assert mask.tolist() == [False, True, True, False, True, False]
    assert torch.equal(embeds[1:3], span_a) and torch.equal(embeds[4:5], span_b)
