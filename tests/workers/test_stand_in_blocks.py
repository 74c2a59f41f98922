"""ModelRunner.apply's guard on a follower: the blocks a stand-in (a request this rank
could not take) writes hold K/V that are not the request's, so no other request may read
them as its cached prefix; once a block is handed out afresh, it is clean again."""

from __future__ import annotations

import pytest
import torch

from workers.config import EngineConfig, ModelConfig
from workers.intake import Intake, RequestState
from workers.messages import ScheduledRequest, StepPlan
from workers.model_runner import ModelRunner
from workers.parallel import ProcessGroup

BLOCK = 4


@pytest.fixture
def runner(tiny_checkpoints):
    path = tiny_checkpoints("llama")
    config = EngineConfig(model=str(path), model_config=ModelConfig.from_pretrained(path), max_model_len=64,
                          block_size=BLOCK, kv_cache_memory_bytes=1 << 20)
    return ModelRunner(config, ProcessGroup(), torch.device("cpu"))


def schedule(runner, intake, *scheduled: ScheduledRequest, step_id: int = 0) -> None:
    runner.apply(StepPlan(step_id, (), (), (), scheduled), intake, 1.0)


def arrive(intake, req_id: str, *, stand_in: bool = False) -> None:
    intake.put(RequestState(req_id, 8, list(range(8)), None, stand_in=stand_in))


def test_a_prefix_a_stand_in_wrote_is_never_read(runner):
    intake = Intake()
    arrive(intake, "stand-in", stand_in=True)
    schedule(runner, intake, ScheduledRequest("stand-in", 0, 8, (1, 2), True))
    arrive(intake, "sharer")
    with pytest.raises(RuntimeError, match="request sharer shares cached K/V that rank 0 computed"):
        schedule(runner, intake, ScheduledRequest("sharer", 4, 4, (1, 3), True), step_id=1)


def test_a_block_handed_out_afresh_is_clean_again(runner):
    intake = Intake()
    arrive(intake, "stand-in", stand_in=True)
    schedule(runner, intake, ScheduledRequest("stand-in", 0, 8, (1, 2), True))
    arrive(intake, "fresh")
    schedule(runner, intake, ScheduledRequest("fresh", 0, 8, (1, 4), True), step_id=1)  # block 1 rewritten
    arrive(intake, "sharer")
    schedule(runner, intake, ScheduledRequest("sharer", 4, 4, (1, 5), True), step_id=2)  # reads block 1: fine
    assert runner.requests["sharer"].block_ids == [1, 5]
    arrive(intake, "late")
    with pytest.raises(RuntimeError, match="request late"):  # block 2 is still the stand-in's
        schedule(runner, intake, ScheduledRequest("late", 8, 1, (4, 2, 6), True), step_id=3)
