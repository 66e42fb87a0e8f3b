"""The guide's other methods: sequential fine-tuning, multi-task mixing, and a sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import clone_run, run_cli

from appliance import events as ev
from appliance import jobs
from appliance.config import TrainConfig
from appliance.store import Store

# the label probe has its own test (test_evaluate, on the trained fixture): these measure the loss only
QUICK = {"max_steps": 3, "batch_size": 4, "max_seq_len": 192, "eval_every": 3, "save_every": 100, "rank": 8,
         "alpha": 16, "backend": "hf", "task_eval_items": 0}


@pytest.mark.slow
def test_sequential_and_multitask(prepared: tuple[Store, Path], trained: tuple[Store, Path]) -> None:
    store, source = prepared
    first = trained[1]  # the session's trained run, in the same store: 8 steps at rank 8
    second = clone_run(store, source, "seq-second")
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
    assert done.result["steps"] == 3
    wrong = TrainConfig(store=str(store.root), init_from=first.name, **{**QUICK, "rank": 4})
    with pytest.raises(jobs.JobFailed, match="trained rank 8 adapters"):
        jobs.start("train", clone_run(store, source, "seq-wrong"), wrong).wait()


@pytest.mark.slow
def test_sweep_ranks_trials_by_validation_loss(prepared: tuple[Store, Path]) -> None:
    store, source = prepared
    run_dir = clone_run(store, source, "sweep")
    recipe = run_dir / "recipe.yaml"
    recipe.write_text("batch_size: 4\nmax_seq_len: 192\nbackend: hf\nrank: 8\nalpha: 16\ntask_eval_items: 0\n")
    result = run_cli("train", "sweep", "--run", "sweep", "--learning-rate", "1e-6,2e-3", "--max-steps", "4",
                     "--recipe", str(recipe), "--json", store=store.root)
    assert result.returncode == 0, result.stderr
    trials = json.loads(result.stdout)["trials"]
    assert [t["learning_rate"] for t in trials] == [2e-3, 1e-6]  # the useful rate wins
    assert trials[0]["eval_loss"] < trials[1]["eval_loss"]
    assert json.loads((run_dir / "sweep" / "results.json").read_text()) == trials
