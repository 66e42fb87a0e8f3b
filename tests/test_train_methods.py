"""The guide's other methods: sequential fine-tuning, multi-task mixing, and a sweep."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import clone_run, run_cli

from appliance import events as ev
from appliance import jobs
from appliance.config import TrainConfig
from appliance.records import TrainResult
from appliance.store import Store

# the label probe has its own test (test_evaluate, on the trained fixture): these measure the loss only
QUICK = {"max_steps": 3, "batch_size": 4, "max_seq_len": 192, "eval_every": 3, "save_every": 100, "rank": 8,
         "alpha": 16, "backend": "hf", "task_eval_items": 0}


@pytest.mark.slow
def test_sequential_and_multitask(trained: tuple[Store, Path]) -> None:
    store, first = trained  # the session's trained run: 8 steps at rank 8
    second = clone_run(store, first, "seq-second")
    cfg = TrainConfig(store=str(store.root), learning_rate=1e-3, init_from=first.name, mix={first.name: 0.5},
                      **QUICK)
    job = jobs.start("train", second, cfg)
    done = job.wait()
    logs = [e.message for e in ev.read_all(second / "events.jsonl") if isinstance(e, ev.Log)]
    assert any(f"starting from the trained weights of run {first.name}" in m for m in logs)
    own = len((second / "data" / "train.jsonl").read_text().splitlines())
    assert any(f"mixing in {round(0.5 * own)} rows from run {first.name}" in m for m in logs)
    first_losses = [e.loss for e in ev.read_all(first / "events.jsonl") if isinstance(e, ev.Progress) and e.loss]
    second_losses = [e.loss for e in ev.read_all(second / "events.jsonl") if isinstance(e, ev.Progress) and e.loss]
    assert second_losses[0] < first_losses[0] * 0.8  # it started where the first run ended, not from scratch
    assert TrainResult.model_validate(done.result).steps == 3
    wrong = TrainConfig(store=str(store.root), init_from=first.name, **{**QUICK, "rank": 4})
    with pytest.raises(jobs.JobFailed, match="trained rank 8 adapters"):
        jobs.start("train", clone_run(store, first, "seq-wrong"), wrong).wait()


def test_a_sweep_value_no_trial_could_take_is_refused_before_anything_runs(prepared: tuple[Store, Path]) -> None:
    store, source = prepared
    run = clone_run(store, source, "sweep-refused")
    result = run_cli("train", "sweep", "--run", run.name, "--rank", "8,0", "--max-steps", "2", store=store.root)
    assert result.returncode == 1 and "rank 0: Input should be greater than or equal to 1" in result.stderr
    assert not (run / "sweep").exists() and not (run / "events.jsonl").exists()
    result = run_cli("train", "sweep", "--run", run.name, store=store.root)
    assert result.returncode == 1 and "nothing to sweep" in result.stderr
