"""The memory planner predicts the measured peak within 30% on the CPU, and a run that cannot fit
is refused before anything loads, with the nearest setting that fits."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DEFAULT_MODEL, clone_run

from appliance import jobs
from appliance.config import TrainConfig
from appliance.store import Store
from appliance.train import planner


@pytest.mark.slow
@pytest.mark.parametrize(("batch_size", "checkpointing"), [(2, False), (16, True)])
def test_prediction_is_within_30_percent_of_measured_peak(batch_size: int, checkpointing: bool,
                                                          prepared: tuple[Store, Path]) -> None:
    store, source = prepared
    run_dir = clone_run(store, source, f"plan-{batch_size}-{checkpointing}")
    cfg = TrainConfig(store=str(store.root), max_steps=2, batch_size=batch_size, max_seq_len=256,
                      gradient_checkpointing=checkpointing, eval_every=1000, save_every=1000, backend="hf")
    done = jobs.start("train", run_dir, cfg).wait()
    measured = done.result["peak_mem_mb"]
    planned = next(e.value for e in jobs.ev.read_all(run_dir / "events.jsonl")
                   if isinstance(e, jobs.ev.Metric) and e.name == "planned_peak_mb")
    assert abs(planned - measured) / measured < 0.30, (planned, measured)


def test_impossible_setting_is_refused_with_the_nearest_fit(default_model_dir: Path) -> None:
    cfg = TrainConfig(store="/tmp/unused", batch_size=64, max_seq_len=4096)
    tight = planner.plan(cfg, default_model_dir, 134_515_008, 4096, "cpu", available_mb=8000)
    assert not tight.fits and tight.peak_mb > 8000
    change, fitted = planner.nearest_fit(cfg, default_model_dir, 134_515_008, 4096, "cpu", 8000) or ({}, None)
    assert fitted is not None and fitted.fits
    assert change["gradient_checkpointing"] is True
    assert change.get("batch_size", 64) * change.get("grad_accum", 1) == 64  # same effective batch
    assert planner.as_flags(change).startswith("--gradient-checkpointing")


@pytest.mark.slow
def test_refusal_through_the_job(prepared: tuple[Store, Path]) -> None:
    store, source = prepared
    run_dir = clone_run(store, source, "too-big")
    cfg = TrainConfig(store=str(store.root), batch_size=1024, max_steps=1, backend="hf")
    with pytest.raises(jobs.JobFailed) as excinfo:
        jobs.start("train", run_dir, cfg).wait()
    assert "GiB of cpu memory but" in excinfo.value.message
    assert "--gradient-checkpointing" in excinfo.value.hint and "--batch-size" in excinfo.value.hint
    assert not (run_dir / "checkpoints").exists()


def test_lora_parameter_count_matches_peft(default_model_dir: Path) -> None:
    import json

    config = json.loads((default_model_dir / "config.json").read_text())
    assert planner._lora_params(config, 16, "all-linear") == 4_884_480  # what peft reported for this model
    assert DEFAULT_MODEL in str(default_model_dir)


def test_a_worker_reports_its_own_peak_memory_not_its_parents() -> None:
    """A job worker started from a large process (a test session holding models) must not inherit
    that process's peak: ru_maxrss survives exec, so the planner's check would compare against it."""
    import subprocess
    import sys

    ballast = bytearray(600 * 2**20)
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))  # touch every page
    code = "from appliance.hardware import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 300, child
    del ballast
