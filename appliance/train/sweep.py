"""Hyperparameter sweep: short trainings over a grid (or a random sample of it), ranked by
validation loss. Each trial is an ordinary training job in `runs/<run>/sweep/trial-N/`, sharing
the run's prepared data, so a trial can be inspected (or resumed) like any run."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance import events as ev
from appliance import jobs
from appliance.config import TrainConfig
from appliance.errors import ApplianceError
from appliance.fsutil import atomic_write_text

SWEEPABLE = ("learning_rate", "rank", "epochs", "alpha", "batch_size")


def trials(grid: dict[str, list[Any]], sample: int | None, seed: int) -> list[dict[str, Any]]:
    keys = sorted(grid)
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]
    if sample is not None and sample < len(combos):
        combos = random.Random(seed).sample(combos, sample)
    return combos


def run_sweep(base: TrainConfig, run_dir: Path, grid: dict[str, list[Any]], sample: int | None,
              on_event: Callable[[ev.Event], None] | None = None) -> list[dict[str, Any]]:
    """Run every trial in turn; returns them ranked, best (lowest validation loss) first."""
    results = []
    for number, change in enumerate(trials(grid, sample, base.seed), 1):
        trial_dir = run_dir / "sweep" / f"trial-{number}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        data = trial_dir / "data"
        if not data.exists():
            data.symlink_to(run_dir / "data", target_is_directory=True)
        cfg = base.model_copy(update={**change, "resume": False})
        steps = cfg.max_steps or 10**9
        cfg = cfg.model_copy(update={"eval_every": steps, "save_every": steps})
        entry: dict[str, Any] = {"trial": number, **change, "dir": str(trial_dir)}
        try:
            done = jobs.start("train", trial_dir, cfg).wait(on_event)
            entry.update(eval_loss=done.result["eval_loss"], train_loss=done.result["train_loss"],
                         steps=done.result["steps"], seconds=done.result["seconds"])
        except ApplianceError as exc:
            entry.update(eval_loss=None, error=exc.message)
        results.append(entry)
    ranked = sorted(results, key=lambda r: (r["eval_loss"] is None, r["eval_loss"] or 0.0))
    atomic_write_text(run_dir / "sweep" / "results.json", json.dumps(ranked, indent=2) + "\n")
    return ranked
