"""A hyperparameter sweep as a job: short trainings over a grid (or a random sample of it), one after the
other, ranked by validation loss.

Each trial is an ordinary training job in `runs/<run>/sweep/trial-N/`, on the run's prepared data, so a
trial can be inspected (or resumed) like any run. The sweep's own job follows each trial's events and
says which trial it is at; cancelling the sweep stops the trial that runs and ranks the ones that finished.
The ranked table is kept in `sweep/results.json`.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

from appliance import events as ev
from appliance import jobs
from appliance.config import SweepConfig
from appliance.errors import ApplianceError, Cancelled
from appliance.records import SweepResult, SweepTrial, TrainResult
from appliance.run import Run
from appliance.store import Store


def trials(grid: dict[str, list[Any]], sample: int | None, seed: int) -> list[dict[str, Any]]:
    """Every combination of the grid's values (a seeded sample of them, when asked)."""
    keys = sorted(grid)
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]
    if sample is not None and sample < len(combos):
        combos = random.Random(seed).sample(combos, sample)
    return combos


def run(cfg: SweepConfig, run_dir: Path, emit: ev.Emitter) -> SweepResult:
    target = Run(Store.open(cfg.store), run_dir)
    target.require_data_report()
    planned = trials(cfg.grid, cfg.sample, cfg.train.seed)
    emit.log(f"{len(planned)} trial(s) of {cfg.train.max_steps or 'the configured'} steps each")
    results: list[SweepTrial] = []
    try:
        for number, change in enumerate(planned, 1):
            results.append(_trial(cfg, target, number, len(planned), change, emit))
    finally:
        ranked = sorted(results, key=lambda r: (r.eval_loss is None, r.eval_loss or 0.0))
        result = SweepResult(run=target.id, grid=cfg.grid, trials=ranked)
        target.write_sweep(result)
    best = result.best
    emit.log(f"best: {_describe(best.settings)}, validation loss {best.eval_loss:.4f}" if best is not None
             else "no trial finished with a validation loss")
    return result


def _trial(cfg: SweepConfig, run: Run, number: int, count: int, change: dict[str, Any],
           emit: ev.Emitter) -> SweepTrial:
    trial_dir = run.sweep_dir / f"trial-{number}"
    trial_dir.mkdir(parents=True, exist_ok=True)
    data = trial_dir / run.data_dir.name
    if not data.exists():
        data.symlink_to(run.data_dir, target_is_directory=True)
    trial_cfg = cfg.train.model_copy(update={**change, "resume": False})
    steps = trial_cfg.max_steps or 10**9
    trial_cfg = trial_cfg.model_copy(update={"eval_every": steps, "save_every": steps})  # one evaluation, at the end
    entry = SweepTrial(trial=number, settings=change, dir=str(trial_dir))
    emit.log(f"trial {number}/{count}: {_describe(change)}")
    job = jobs.start("train", trial_dir, trial_cfg)
    try:
        done = job.wait(lambda event: _forward(event, number, count, emit))
        result = TrainResult.model_validate(done.result)
        entry = entry.model_copy(update={"eval_loss": result.eval_loss, "train_loss": result.train_loss,
                                         "steps": result.steps, "seconds": result.seconds})
    except Cancelled:
        job.cancel()  # the trial is a job of its own: it stops at its next step, and keeps a checkpoint
        raise
    except ApplianceError as exc:
        entry = entry.model_copy(update={"error": exc.message})
        emit.log(f"trial {number} failed: {exc.message}", "warning")
    return entry


def _forward(event: ev.Event, number: int, count: int, emit: ev.Emitter) -> None:
    """A trial's progress as the sweep's, and the sweep's cancel passed on to the trial."""
    if isinstance(event, ev.Progress):
        emit(event.model_copy(update={"phase": f"trial {number}/{count}: {event.phase}"}))
    if emit.cancelled():
        raise Cancelled(f"the sweep was stopped during trial {number} of {count}; the finished trials are ranked",
                        "Start the sweep again when you are ready.")


def _describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
                     for name, value in settings.items())
