"""The training time budget (`max_minutes`): the steps that fit are measured on the first steps,
the learning-rate schedule is refitted to them, and training stops before the budget is overrun."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import get_scheduler

from appliance.config import TrainConfig
from appliance.train.checkpoint import TrainerState
from appliance.train.loop import FIT_AFTER, _budget


def _session(minutes: float, total: int, resumed_from: int | None = None) -> Any:
    cfg = TrainConfig(store="/tmp/unused", max_minutes=minutes, max_steps=total, learning_rate=1e-3,
                      scheduler="cosine", warmup_ratio=0.1)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.learning_rate)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=int(total * 0.1), num_training_steps=total)
    logs: list[str] = []
    emit = SimpleNamespace(log=lambda message, level="info": logs.append(message))
    session = SimpleNamespace(cfg=cfg, optimizer=optimizer, scheduler=scheduler, total_steps=total, emit=emit,
                              resumed_from=resumed_from)
    for _ in range(FIT_AFTER if resumed_from is None else 0):
        optimizer.step()
        scheduler.step()
    return session, logs


def test_the_steps_and_schedule_are_fitted_to_the_budget() -> None:
    session, logs = _session(minutes=1.0, total=100)  # 60 s
    state = TrainerState(step=FIT_AFTER)
    assert _budget(session, state, elapsed=FIT_AFTER * 2.0) is None  # 2 s a step: 30 steps fit
    assert session.total_steps == 30
    assert "about 30 steps fit in 1 minute at 2.0 s a step: training 30 steps" in logs[0]
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    expected = get_scheduler("cosine", reference, num_warmup_steps=3, num_training_steps=30)
    for _ in range(FIT_AFTER):
        reference.step()
        expected.step()
    assert session.scheduler.get_last_lr()[0] == pytest.approx(expected.get_last_lr()[0])
    assert session.optimizer.param_groups[0]["lr"] == pytest.approx(expected.get_last_lr()[0])


def test_the_fit_is_redone_once_an_evaluation_has_cost_its_time() -> None:
    session, logs = _session(minutes=1.0, total=100)
    session.cfg = session.cfg.model_copy(update={"eval_every": 10, "save_every": 1000})
    assert _budget(session, TrainerState(step=FIT_AFTER), elapsed=FIT_AFTER * 1.0) is None  # 1 s a step: 60 fit
    assert session.total_steps == 60
    assert _budget(session, TrainerState(step=10), elapsed=10.0) is None  # the step of the evaluation: no refit yet
    assert _budget(session, TrainerState(step=11), elapsed=22.0) is None  # the evaluation took 10 s: 2 s a step since
    assert session.total_steps == 11 + int((60 - 22) / 2.0) == 30
    assert "about 30 steps fit" in logs[-1]
    assert session.scheduler.last_epoch == 11  # the new schedule is where the run is


def test_a_budget_that_fits_every_step_changes_nothing() -> None:
    session, logs = _session(minutes=10.0, total=20)
    before = session.scheduler
    assert _budget(session, TrainerState(step=FIT_AFTER), elapsed=FIT_AFTER * 1.0) is None
    assert session.total_steps == 20 and session.scheduler is before and logs == []


def test_training_stops_before_the_next_step_would_overrun() -> None:
    session, _ = _session(minutes=1.0, total=100)
    assert _budget(session, TrainerState(step=20), elapsed=50.0) is None  # 2.5 s a step: 52.5 s < 60 s
    reason = _budget(session, TrainerState(step=23), elapsed=58.0)
    assert reason == "the time budget of 1 minute is spent: stopped at step 23 of 100"


def test_a_resumed_run_is_held_to_the_budget_of_its_own_session() -> None:
    session, logs = _session(minutes=1.0, total=100, resumed_from=50)
    assert _budget(session, TrainerState(step=50 + FIT_AFTER), elapsed=8.0) is None
    assert session.total_steps == 100 and logs == []  # the schedule of a resumed run stays as saved
    assert _budget(session, TrainerState(step=70), elapsed=59.0) is not None
