"""Run a stage as a child process, follow its events, cancel it, explain how it ended.

A stage can run out of memory, crash in a native library or be killed by the kernel; the caller
(CLI or TUI) must survive all of that. `start()` writes the job's spec to `job.json` and launches
`python -m appliance.worker DIR`, which writes `events.jsonl` and `job.log` in the same folder.
A death by signal becomes a readable `error` event appended on the child's behalf.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from appliance import events as ev
from appliance import integrity, jobhost, unused
from appliance.errors import ApplianceError, Cancelled, JobBusy, JobFailed
from appliance.fsutil import fds_of
from appliance.records import JobEntry, JobRecord
from appliance.run import Run, job_record, last_job, write_job_record
from appliance.store import Store

LOG_FILE = "job.log"
LOCK_FILE = ev.LOCK_FILE
DISK_FULL_STATUS = 74  # EX_IOERR: the worker could not even write why it stopped

# stage name -> (config class path, run function path); resolved lazily in the child only.
STAGES: dict[str, tuple[str, str]] = {
    "import": ("appliance.config:ImportConfig", "appliance.importer:run"),
    "data": ("appliance.config:DataConfig", "appliance.data.prepare:run"),
    "train": ("appliance.config:TrainConfig", "appliance.train.loop:run"),
    "export": ("appliance.config:ExportConfig", "appliance.export.run:run"),
    "eval": ("appliance.config:EvalConfig", "appliance.evaluate.run:run"),
    "sweep": ("appliance.config:SweepConfig", "appliance.sweep:run"),
}
RUN_STAGES = ("data", "train", "export", "eval", "sweep")  # the stages that work in a run (import: in jobs/)

_SIGNAL_HINTS: dict[int, tuple[str, str]] = {
    signal.SIGKILL: (
        "killed, probably out of memory",
        "Lower the batch size or sequence length, or close other programs; "
        "`dmesg | grep -i oom` shows whether the kernel's OOM killer stopped it.",
    ),
    signal.SIGSEGV: (
        "crashed in a native library (segmentation fault)",
        "Run `appliance doctor`; the last lines of job.log show where it stopped.",
    ),
    signal.SIGABRT: (
        "aborted by a native library",
        "The last lines of job.log usually say why (an assertion or a CUDA error).",
    ),
    signal.SIGBUS: (
        "crashed reading a file (bus error)",
        "A model or data file may be truncated or on a failing disk; check free space.",
    ),
    signal.SIGTERM: ("stopped by a termination signal", "Start it again when you are ready."),
    signal.SIGINT: ("interrupted", "Start it again when you are ready."),
}


def describe_exit(returncode: int) -> tuple[str, str]:
    """A human sentence and a hint for a child that ended without reporting an error itself."""
    if returncode == DISK_FULL_STATUS:
        return ("the job stopped because the disk is full (or a file-size limit was reached): it could not write, "
                "not even why it stopped",
                "Free space on the store's disk (`df -h` shows it) and run it again: nothing half-written was kept.")
    if returncode < 0:
        signum = -returncode
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        what, hint = _SIGNAL_HINTS.get(
            signum, (f"killed by {name}", "The last lines of job.log may say why.")
        )
        return f"the job was {what} ({name})", hint
    return (
        f"the job exited with status {returncode} without reporting why",
        "The last lines of job.log show what happened.",
    )


@dataclass
class Job:
    """A running (or finished) stage in its own process.

    `process` is None for a job this process did not start (see `attach`): it is then followed
    through its pid and its files, so a TUI that was closed and reopened picks its jobs up again.
    """

    stage: str
    dir: Path
    process: subprocess.Popen[bytes] | jobhost.HostedProcess | None
    offset: int = 0  # where this job's events begin: a run's earlier stages wrote before it
    pid: int = 0
    end: int | None = None  # where its events end, for a job that a later job followed (None: the last job)
    _ended_reported: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.process is not None:
            self.pid = self.process.pid

    @property
    def events_path(self) -> Path:
        return self.dir / ev.EVENTS_FILE

    @property
    def log_path(self) -> Path:
        return self.dir / LOG_FILE

    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self.end is None and _worker_alive(self.pid, self.dir)

    def events(self) -> list[ev.Event]:
        """Its events so far."""
        return ev.read_all(self.events_path, self.offset, self.end)

    def cancel(self, grace_s: float = 30.0) -> None:
        """Ask the stage to stop at its next safe point (SIGTERM); kill it after `grace_s`."""
        if not self.running():
            return
        os.kill(self.pid, signal.SIGTERM)
        if not self._wait(grace_s):
            self.kill()

    def kill(self) -> None:
        if self.running():
            os.kill(self.pid, signal.SIGKILL)
            self._wait(None)

    def _wait(self, timeout: float | None) -> bool:
        """Wait for the process to end; False when `timeout` passed first."""
        if self.process is not None:
            try:
                self.process.wait(timeout=timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    @property
    def returncode(self) -> int | None:
        """The exit status; None while running, and for an attached job (not our child)."""
        return self.process.returncode if self.process is not None else None

    def _report_abnormal_end(self) -> None:
        """Append an error event when the child died without writing its own last word."""
        if self._ended_reported or self.end is not None:
            return
        self._ended_reported = True
        final = [e for e in self.events() if isinstance(e, ev.Error | ev.Done)]
        if final:
            return
        returncode = self.returncode
        message, hint = describe_exit(returncode) if returncode is not None else (
            "the job's process ended without reporting why (it may have been killed, e.g. out of memory)",
            "The last lines of job.log show what happened.")
        with ev.EventWriter(self.events_path) as writer:
            writer(ev.Error(title="Job ended unexpectedly", message=message, hint=hint))

    def follow(self, poll_s: float = 0.1, stop: Callable[[], bool] | None = None) -> Iterator[ev.Event]:
        """Yield the job's events as they come, until it has ended and all are read, or until `stop()`
        says the follower is going away (the job itself carries on)."""
        if self.end is not None:  # an earlier job of the folder: its events are all written
            yield from self._replay()
            return
        finished_at: float | None = None
        for event in ev.follow(self.events_path, poll_s=poll_s, offset=self.offset):
            if stop is not None and stop():
                return
            if event is not None:
                if isinstance(event, ev.Error | ev.Done):
                    # The job's last word is written just before its process ends: wait for that end first, so
                    # a caller that stops reading here (wait() returns on Done) finds the run's lock released.
                    self._wait(None)
                    yield event
                    return
                yield event
                continue
            if finished_at is None and not self.running():
                self._report_abnormal_end()
                finished_at = time.monotonic()  # one more pass reads what was appended
            elif finished_at is not None:
                return

    def _replay(self) -> Iterator[ev.Event]:
        events = self.events()
        final = next((i for i, e in enumerate(events) if isinstance(e, ev.Error | ev.Done)), None)
        yield from events if final is None else events[: final + 1]
        if final is None:
            yield ev.Error(title="Job ended unexpectedly", message="the job's process ended without reporting why "
                           "(it may have been killed, e.g. out of memory)",
                           hint=f"The last lines of {self.log_path} show what happened.")

    def wait(self, on_event: Callable[[ev.Event], None] | None = None) -> ev.Done:
        """Follow to the end; return the `done` event or raise the job's error."""
        last_error: ev.Error | None = None
        for event in self.follow():
            if on_event is not None:
                on_event(event)
            if isinstance(event, ev.Done):
                return event
            if isinstance(event, ev.Error):
                last_error = event
        self._wait(None)
        if last_error is None:
            message, hint = describe_exit(self.returncode or 0)
            raise JobFailed(message, hint)
        error_class = Cancelled if last_error.title == Cancelled.title else JobFailed
        raise error_class(last_error.message, last_error.hint, title=last_error.title)


def start(stage: str, job_dir: Path, config: BaseModel, env: dict[str, str] | None = None) -> Job:
    """Launch `stage` with `config` in its own process, writing into `job_dir` (a run or a job folder).

    One job at a time per folder: the worker holds the folder's lock (an flock, released by the kernel
    however the worker ends), and a second start while it lives raises JobBusy before touching anything.
    Under the lock, what killed jobs left behind is swept, and the stage's settings are recorded in the
    run's run.yaml, so the record is the same whichever front end started the job."""
    if stage not in STAGES:
        raise ApplianceError(f"unknown stage {stage!r}", f"Known stages: {', '.join(STAGES)}.")
    job_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(job_dir)
    try:
        integrity.sweep_litter(job_dir)
        if stage in RUN_STAGES:
            Run(Store(Path(config.model_dump()["store"])), job_dir).record(stage, config)
        events_path = job_dir / ev.EVENTS_FILE
        offset = events_path.stat().st_size if events_path.exists() else 0
        previous = job_record(job_dir)
        record = JobRecord(stage=stage, config=config.model_dump(mode="json"), offset=offset,
                           history=previous.jobs() if previous is not None else [])
        write_job_record(job_dir, record)
        child_env = dict(os.environ)
        if env:
            child_env.update(env)
        with open(job_dir / LOG_FILE, "ab") as log:
            process: subprocess.Popen[bytes] | jobhost.HostedProcess | None = None
            if jobhost.enabled(stage, child_env):  # forked from a process that has imported the libraries
                process = jobhost.spawn(job_dir, child_env, unused.unused(stage, record.config), log.fileno(), lock)
            if process is None:
                process = subprocess.Popen(
                    [sys.executable, "-m", "appliance.worker", str(job_dir)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=child_env,
                    start_new_session=True,  # a Ctrl-C in the terminal reaches the parent, which cancels
                    pass_fds=(lock,),  # the worker holds the lock for as long as it lives
                )
        record.pid, record.started = process.pid, time.time()
        record.history.append(JobEntry(stage=stage, offset=offset, pid=process.pid, started=record.started))
        write_job_record(job_dir, record)
    finally:
        os.close(lock)
    return Job(stage=stage, dir=job_dir, process=process, offset=offset)


def _lock(job_dir: Path) -> int:
    """The folder's job lock, taken; JobBusy when a job holds it."""
    fd = os.open(job_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = attach(job_dir)
        what = f"its {holder.stage} job (pid {holder.pid})" if holder is not None and holder.running() \
            else "another job"
        raise JobBusy(f"{job_dir} is in use: {what} is still running, and two jobs on one run would overwrite "
                      "each other's files",
                      "Wait for it to finish (the TUI and `tail -f events.jsonl` follow it), or stop it first "
                      f"(`kill {holder.pid if holder is not None and holder.pid else 'PID'}` stops it at its next "
                      "safe point).") from None
    return fd


def busy(job_dir: Path) -> bool:
    """True while a job holds the folder's lock."""
    if not (job_dir / LOCK_FILE).exists():
        return False
    try:
        os.close(_lock(job_dir))
    except JobBusy:
        return True
    return False


def attach(job_dir: Path, stage: str | None = None) -> Job | None:
    """The job last started in `job_dir` (by any process), or the last job of `stage` there; None when there
    is none. Its events are read from where it began to where the next job's begin; `running()` says whether
    its worker still lives."""
    found = last_job(job_dir, stage)
    if found is None:
        return None
    entry, end = found
    return Job(stage=entry.stage, dir=job_dir, process=None, offset=entry.offset, pid=entry.pid, end=end)


def _worker_alive(pid: int, job_dir: Path) -> bool:
    """True while `pid` is the worker of `job_dir` (not a later process that reused the number)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    if status == "Z":
        return False
    target = job_dir.resolve()
    if b"appliance.jobhost" in cmdline:  # forked by a job host: the worker is the process that holds the lock
        return str(target / LOCK_FILE) in fds_of(pid)
    if b"appliance.worker" not in cmdline:
        return False
    return any(Path(os.fsdecode(arg)).resolve() == target for arg in cmdline[cmdline.index(b"appliance.worker") + 1:]
               if arg)


def run(stage: str, job_dir: Path, config: BaseModel, on_event: Callable[[ev.Event], None] | None = None) -> ev.Done:
    """Start a job and wait for it; Ctrl-C cancels it cleanly instead of orphaning it."""
    job = start(stage, job_dir, config)
    try:
        return job.wait(on_event)
    except KeyboardInterrupt:
        job.cancel()
        raise
