"""The typed Run: records written and read in one place, a damaged record named, and every job of a run kept
in its job record, so each stage's last job and typed result can be found whatever ran after it."""

from __future__ import annotations

from pathlib import Path

import fakes
import pytest

from appliance import events as ev
from appliance import jobs
from appliance.errors import StoreError
from appliance.records import JobEntry, JobRecord, TrainResult
from appliance.run import Run, write_job_record
from appliance.store import Store


def _job(run: Run, stage: str, pid: int, events: list[ev.Event], history: list[JobEntry]) -> list[JobEntry]:
    """What jobs.start and a worker leave: the job in the record, its events appended."""
    offset = run.events_path.stat().st_size if run.events_path.exists() else 0
    history = [*history, JobEntry(stage=stage, offset=offset, pid=pid)]
    write_job_record(run.path, JobRecord(stage=stage, offset=offset, pid=pid, history=history))
    with ev.EventWriter(run.events_path) as writer:
        for event in events:
            writer(event)
    return history


def _trained(steps: int) -> dict[str, object]:
    return TrainResult(adapter="adapter", sha256="0" * 64, backend="hf", method="lora", steps=steps, train_loss=1.0,
                       eval_loss=None, real_tokens=100, train_seconds=1.0, peak_mem_mb=1.0, seconds=1.0).model_dump()


def test_each_stage_keeps_its_last_job_and_result_whatever_ran_after(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    run = store.new_run("history")
    history = _job(run, "train", 11, [ev.Progress(phase="training", step=1), ev.Done(result=_trained(3))], [])
    history = _job(run, "train", 12, [ev.Done(result=_trained(8))], history)
    history = _job(run, "export", 13, [ev.Error(title="Export problem", message="planted")], history)
    _job(run, "eval", 14, [ev.Progress(phase="evaluating base")], history)  # killed: no last word

    result = run.result("train")
    assert isinstance(result, TrainResult) and result.steps == 8  # the last training, not the first
    assert run.result("export") is None and run.result("eval") is None and run.result("data") is None
    train = jobs.attach(run.path, "train")
    assert train is not None and train.pid == 12 and not train.running()
    assert [type(e).__name__ for e in train.follow()] == ["Done"]  # its events only, not the export's
    killed = jobs.attach(run.path, "eval")
    assert killed is not None and [type(e).__name__ for e in killed.events()] == ["Progress"]
    last = jobs.attach(run.path)
    assert last is not None and last.stage == "eval"


def test_records_are_written_and_read_through_the_run(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    run = store.new_run("records")
    report = fakes.data_report(store)
    run.write_data_report(report)
    assert run.data_report() == report and run.prepared and run.task == "classification"
    run.write_verification(fakes.verification(run.id))
    assert run.exported and run.verification() == fakes.verification(run.id)
    assert run.items("test") == [] and run.comparison() is None
    run.data_report_path.write_text('{"counts": "damaged"', encoding="utf-8")
    with pytest.raises(StoreError, match=r"data_report\.json is unreadable or damaged") as caught:
        run.data_report()
    assert "Prepare the data again" in caught.value.hint
