"""Events are typed, flushed and throttled; jobs explain how they ended."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from appliance import events as ev
from appliance import jobs
from appliance.errors import Cancelled


def test_round_trip_and_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with ev.EventWriter(path, min_interval_s=0) as writer:
        writer(ev.Progress(phase="train", step=3, total=10, loss=1.5))
        writer(ev.Metric(name="eval_loss", value=0.5))
        writer(ev.Done(result={"ok": True}))
    with open(path, "a") as handle:
        handle.write('{"type": "progress", "pha')  # a writer killed mid-line
    got = ev.read_all(path)
    assert [type(e) for e in got] == [ev.Progress, ev.Metric, ev.Done]
    progress = got[0]
    assert isinstance(progress, ev.Progress) and progress.loss == 1.5 and progress.total == 10


def test_progress_is_throttled_but_the_newest_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with ev.EventWriter(path, min_interval_s=10) as writer:
        for step in range(100):
            writer(ev.Progress(phase="train", step=step))
        writer(ev.Log(message="finished"))
    got = ev.read_all(path)
    steps = [e.step for e in got if isinstance(e, ev.Progress)]
    assert steps == [0, 99]  # the first, then the last before the next other event
    assert isinstance(got[-1], ev.Log)


def test_follow_yields_lines_as_they_complete(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    follower = ev.follow(path, poll_s=0)
    assert next(follower) is None  # nothing yet
    path.write_text('{"type": "log", "message": "a"}\n{"type": "log", "mes')
    first = next(follower)
    assert isinstance(first, ev.Log) and first.message == "a"
    assert next(follower) is None  # the torn line waits for its end
    with open(path, "a") as handle:
        handle.write('sage": "b"}\n')
    second = next(follower)
    assert isinstance(second, ev.Log) and second.message == "b"


@pytest.mark.parametrize(
    ("signum", "words"),
    [(signal.SIGKILL, "out of memory"), (signal.SIGSEGV, "segmentation fault"),
     (signal.SIGABRT, "aborted"), (signal.SIGBUS, "bus error")],
)
def test_death_by_signal_reads_as_a_sentence(signum: int, words: str) -> None:
    message, hint = jobs.describe_exit(-signum)
    assert words in message and signal.Signals(signum).name in message and hint


def test_emitter_cancel_flag(tmp_path: Path) -> None:
    flag = {"stop": False}
    got: list[ev.Event] = []
    emit = ev.Emitter(got.append, lambda: flag["stop"])
    emit.progress("x", 1, 2)
    emit.check_cancelled()
    flag["stop"] = True
    with pytest.raises(Cancelled):
        emit.check_cancelled()
    artifact = tmp_path / "a.bin"
    artifact.write_bytes(b"abc")
    digest = emit.artifact(artifact, kind="test")
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert isinstance(got[-1], ev.Artifact) and got[-1].size == 3


def test_job_reports_its_error_as_an_event(tmp_path: Path) -> None:
    from appliance.config import ImportConfig

    cfg = ImportConfig(source=str(tmp_path / "missing"), store=str(tmp_path / "store"))
    started = time.monotonic()
    job = jobs.start("import", tmp_path / "job", cfg)
    with pytest.raises(jobs.JobFailed) as excinfo:
        job.wait()
    assert "neither a catalog name nor an existing path" in excinfo.value.message
    assert excinfo.value.title == "Model store problem"
    assert job.process.returncode == 1 and time.monotonic() - started < 120


def test_another_process_can_attach_to_a_job(tmp_path: Path) -> None:
    """A job started here is found again from its folder alone (as a reopened TUI does): same pid,
    alive while it runs, its events from the first one on, and nothing once it has ended."""
    import os

    from appliance.config import ImportConfig

    assert jobs.attach(tmp_path / "nothing-here") is None
    cfg = ImportConfig(source=str(tmp_path / "missing"), store=str(tmp_path / "store"))
    job = jobs.start("import", tmp_path / "job", cfg)
    attached = jobs.attach(tmp_path / "job")
    assert attached is not None and attached.process is None
    assert (attached.stage, attached.pid, attached.offset) == ("import", job.process.pid, 0)  # type: ignore[union-attr]
    events = list(attached.follow())
    assert isinstance(events[-1], ev.Error) and "neither a catalog name" in events[-1].message
    job.process.wait()  # type: ignore[union-attr]
    assert not attached.running()
    # a pid that now belongs to another program is not taken for the worker
    assert not jobs._worker_alive(os.getpid(), tmp_path / "job")  # python, but not that folder's worker
