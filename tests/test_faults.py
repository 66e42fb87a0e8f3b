"""Faults: a job killed with SIGKILL at its worst moments, a disk that fills up under it, and a second
job on a busy run. After each, the run is consistent (nothing half-written registered: `check_run`),
and running the stage again completes. The points killed at are drawn with a seeded generator from
each stage's fault points (APPLIANCE_CHAOS_SEED changes the draw; bench/chaos.py runs many rounds,
also at random times)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import TINY_MODEL, TRAIN_SETTINGS, clone_run, run_cli, step_losses
from pydantic import BaseModel

from appliance import faults, integrity, jobs
from appliance.config import DataConfig, ExportConfig, TrainConfig
from appliance.data.sample import shipped_path
from appliance.errors import JobBusy, JobFailed
from appliance.records import DataResult, ExportResult, FileReport, TrainResult, Verification
from appliance.run import JOB_FILE, Run
from appliance.store import Store

R = TypeVar("R", bound=BaseModel)

SEED = int(os.environ.get("APPLIANCE_CHAOS_SEED", "20261129"))
# The tiny random-weight Llama (what is under test is the jobs, not the model: a bigger one only costs time).
TRAIN = {**TRAIN_SETTINGS, "max_steps": 4, "batch_size": 2, "max_seq_len": 128, "eval_every": 100, "save_every": 2,
         "dtype": "float32", "task_eval_items": 0, "base_model": TINY_MODEL}

# Each stage's fault points, in the order it passes them (with the pass to stop at).
POINTS = {
    "data": ["data.rows#2", "data.splits", "write:data_report.json", "data.register"],
    "train": ["train.step#1", "train.checkpoint", "write:trainer_state.json", "train.checkpoint.register#2",
              "train.adapter", "train.adapter.register"],
    "export": ["export.merge", "export.merge.register", "export.convert", "export.quantize", "export.verify",
               "export.register", "write:manifest.json"],
}


def draw(stage: str, k: int) -> list[str]:
    return random.Random(f"{SEED}-{stage}").sample(POINTS[stage], k)


def killed_at(stage: str, run_dir: Path, cfg: Any, point: str) -> None:
    """Run `stage` with a SIGKILL at `point`; the job must end killed, the run stay consistent."""
    job = jobs.start(stage, run_dir, cfg, env={faults.ENV: f"kill@{point}"})
    with pytest.raises(JobFailed) as failure:
        job.wait()
    assert job.returncode == -signal.SIGKILL and "SIGKILL" in failure.value.message, (point, failure.value)
    assert integrity.check_run(run_dir) == [], point


def full_disk_at(stage: str, run_dir: Path, cfg: Any, point: str) -> JobFailed:
    """Run `stage` with the disk filling up at `point`; the job must say so, the run stay consistent."""
    job = jobs.start(stage, run_dir, cfg, env={faults.ENV: f"full@{point}"})
    with pytest.raises(JobFailed) as failure:
        job.wait()
    assert failure.value.title == "Disk full" or "disk is full" in failure.value.message, (point, failure.value)
    assert integrity.check_run(run_dir) == [], point
    return failure.value


def sample_data(store: Store) -> DataConfig:
    return DataConfig(inputs=[str(shipped_path())], task="classification", label_field="category", near_dup=False,
                      pii_entities=[], store=str(store.root))  # the faults, not the entity model (tested in test_pii)


def completes(stage: str, run_dir: Path, cfg: Any, result: type[R]) -> R:
    done = jobs.run(stage, run_dir, cfg)
    assert integrity.check_run(run_dir) == []
    assert integrity.litter(run_dir) == []  # what the killed jobs left was swept under the run's lock
    return result.model_validate(done.result)


def test_fault_specs_are_parsed_and_traced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert faults.parse("import.before_register") == ("kill", "import.before_register", 1)
    assert faults.parse("full@write:run.yaml#3") == ("full", "write:run.yaml", 3)
    for bad in ("boom@train.step", "kill@", "kill@train.step#x"):
        with pytest.raises(ValueError, match="APPLIANCE_FAULT"):
            faults.parse(bad)
    trace = tmp_path / "trace"
    monkeypatch.setenv(faults.TRACE_ENV, str(trace))
    monkeypatch.setenv(faults.ENV, "stop@somewhere.else")
    for name in ("a", "b", "a"):
        faults.point(name)
    assert trace.read_text().split() == ["a", "b", "a"]


@pytest.mark.slow
def test_data_preparation_killed_then_prepared_again(scratch_store: Store) -> None:
    store = scratch_store
    run_dir = store.new_run().path
    cfg = sample_data(store)
    for point in draw("data", 2):
        killed_at("data", run_dir, cfg, point)
        assert not (run_dir / "data").exists()  # never half there
    result = completes("data", run_dir, cfg, DataResult)
    assert result.counts.train > 300


@pytest.fixture(scope="module")
def uninterrupted(tiny_prepared: tuple[Store, Path]) -> Path:
    """The run of the training the tests below interrupt, run without a fault (its adapter is what the export is
    interrupted on). Plain float32 on the hf backend: bf16 kernels on the CPU are not bit-reproducible from run to
    run, and what is under test is that a resumed run continues the same trajectory, not the kernels."""
    store, source = tiny_prepared
    run_dir = clone_run(store, source, "uninterrupted")
    jobs.run("train", run_dir, TrainConfig(store=str(store.root), **TRAIN))
    return run_dir


def continues(run_dir: Path, result: TrainResult, uninterrupted: Path) -> None:
    """The resumed job ran the steps after its checkpoint, and every step has the uninterrupted run's loss: the
    weights, optimizer state, schedule and data position all came back."""
    trajectory, expected = step_losses(run_dir), step_losses(uninterrupted)
    assert sorted(trajectory) == list(range(1, TRAIN["max_steps"] + 1)), trajectory
    for step, loss in trajectory.items():
        assert loss == pytest.approx(expected[step], rel=1e-3), (step, trajectory, expected)
    assert result.steps == TRAIN["max_steps"]


@pytest.mark.slow
def test_training_killed_or_out_of_disk_then_resumed(tiny_prepared: tuple[Store, Path],
                                                     uninterrupted: Path) -> None:
    """Killed at two drawn points, then out of disk while writing a checkpoint and the adapter: after each the
    run is consistent and a full disk is explained; the training then resumes and completes."""
    store, source = tiny_prepared
    run_dir = clone_run(store, source, "chaos-train")
    cfg = TrainConfig(store=str(store.root), **TRAIN)
    for point in draw("train", 2):
        killed_at("train", run_dir, cfg, point)
    resume = cfg.model_copy(update={"resume": True})
    for point in ("train.checkpoint", "train.adapter"):
        assert "df -h" in full_disk_at("train", run_dir, resume, point).hint
        assert not (run_dir / "adapter").exists()
    result = completes("train", run_dir, resume, TrainResult)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    continues(run_dir, result, uninterrupted)


@pytest.mark.slow
def test_export_killed_or_out_of_disk_then_exported_again(tiny_prepared: tuple[Store, Path],
                                                         uninterrupted: Path) -> None:
    """Killed at two drawn points, then out of disk at the quantization and at the manifest (a full disk at the
    merge and the conversion: test_export's test_a_full_disk_leaves_nothing_registered): the run stays
    consistent, and the export then completes with a manifest that verifies."""
    store, _ = tiny_prepared
    run_dir = clone_run(store, uninterrupted, "chaos-export")
    shutil.copytree(uninterrupted / "adapter", run_dir / "adapter")
    shutil.copy(uninterrupted / "run.yaml", run_dir / "run.yaml")  # the training's settings: its base model
    cfg = ExportConfig(quants=["Q8_0"], ppl_tokens=128, store=str(store.root))
    for point in sorted(draw("export", 2), key=POINTS["export"].index):
        killed_at("export", run_dir, cfg, point)
    for point in ("export.quantize", "write:manifest.json"):
        full_disk_at("export", run_dir, cfg, point)
    result = completes("export", run_dir, cfg, ExportResult)
    assert [f.quant for f in result.files if f.passed] == ["F16", "Q8_0"]
    verified = run_cli("verify", run_dir.name, "--json", store=store.root)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.slow
def test_a_full_disk_while_preparing_data_is_explained(scratch_store: Store) -> None:
    store = scratch_store
    run_dir = store.new_run().path
    cfg = sample_data(store)
    full_disk_at("data", run_dir, cfg, "data.splits")
    assert not (run_dir / "data").exists()


@pytest.mark.slow
def test_a_second_job_on_a_busy_run_is_refused_then_the_killed_job_resumes_exactly(
        tiny_prepared: tuple[Store, Path], uninterrupted: Path) -> None:
    """A second job on a run that a job holds is refused and changes nothing; the holder, killed with SIGKILL
    in the middle of writing a checkpoint, resumes from the one before and follows the uninterrupted run."""
    store, source = tiny_prepared
    run_dir = clone_run(store, source, "busy")
    cfg = TrainConfig(store=str(store.root), **TRAIN)
    # The first job freezes just before registering its second checkpoint, holding the run's lock.
    first = jobs.start("train", run_dir, cfg, env={faults.ENV: "stop@train.checkpoint.register#2"})
    deadline = time.monotonic() + 300
    while _state(first.pid) != "T":
        assert first.running() and time.monotonic() < deadline, "the first job never reached its stop point"
        time.sleep(0.2)
    recorded = (run_dir / "run.yaml").read_bytes()
    job_file = (run_dir / JOB_FILE).read_bytes()

    with pytest.raises(JobBusy) as busy:
        jobs.start("export", run_dir, ExportConfig(store=str(store.root)))
    assert f"pid {first.pid}" in busy.value.message and f"kill {first.pid}" in busy.value.hint
    cli = run_cli("train", "--run", run_dir.name, store=store.root)
    assert cli.returncode == 1 and "Run is busy" in cli.stderr and "train job" in cli.stderr, cli.stderr
    # The refused starts changed nothing: not the recorded settings, not the job's record.
    assert (run_dir / "run.yaml").read_bytes() == recorded and (run_dir / JOB_FILE).read_bytes() == job_file
    assert jobs.busy(run_dir)

    first.kill()  # SIGKILL while frozen mid-write: the kernel releases the lock with the process
    assert not jobs.busy(run_dir)
    assert integrity.litter(run_dir), "the frozen job had a checkpoint half-written"
    assert integrity.check_run(run_dir) == []
    result = completes("train", run_dir, cfg.model_copy(update={"resume": True}), TrainResult)
    assert result.resumed_from == 2
    continues(run_dir, result, uninterrupted)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_damaged_record_is_named_by_the_check(tmp_path: Path) -> None:
    run = Run.at(tmp_path / "runs" / "run")
    run_dir = run.path
    run.gguf_dir.mkdir(parents=True)
    run.write_verification(Verification(run=run.id, files=[FileReport(file="m-Q8_0.gguf", quant="Q8_0",
                                                                      size_bytes=10, checks=[])]))
    (run.gguf_dir / "m-Q8_0.gguf").write_bytes(b"GGUF")
    (run_dir / "adapter").mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header
                                                                    + b"\0" * 8)
    (run_dir / ".adapter-1a2b3c").mkdir()
    problems = integrity.check_run(run_dir)
    assert any("m-Q8_0.gguf: 4 bytes where the verification record says 10" in p for p in problems), problems
    assert any("adapter_model.safetensors is truncated" in p for p in problems), problems
    assert [p.name for p in integrity.litter(run_dir)] == [".adapter-1a2b3c"]
    assert [p.name for p in integrity.sweep_litter(run_dir)] == [".adapter-1a2b3c"]
    assert integrity.litter(run_dir) == []
