"""Typed job events, written as flushed JSON lines and read back as they arrive.

A job writes `events.jsonl` in its directory; the CLI and the TUI follow that file. Each line is
one event, a pydantic model tagged by `type`. Progress events are throttled to about four a
second (the last one before any other event is always written), so a follower never falls behind.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from appliance.errors import Cancelled
from appliance.fsutil import sha256_file

EVENTS_FILE = "events.jsonl"
LOCK_FILE = ".job.lock"  # held by the job's process while it runs (jobs.py)
PROGRESS_INTERVAL_S = 0.25


class _Event(BaseModel):
    t: float = Field(default_factory=time.time, description="Unix time the event was written")


class Progress(_Event):
    type: Literal["progress"] = "progress"
    phase: str = Field(description="What the job is doing now, in a few words")
    step: int = 0
    total: int | None = None
    loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    mem_mb: float | None = None

    def describe(self, steps: bool = True) -> str:
        """One line for a person: what, how far (unless a progress bar shows it), loss, speed, time left, memory."""
        parts = [self.phase, f"step {self.step}/{self.total}" if steps and self.total else ""]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:,.0f} tok/s")
        if self.eta_s is not None:
            parts.append(f"ETA {int(self.eta_s) // 60}:{int(self.eta_s) % 60:02d}")
        if self.mem_mb:
            parts.append(f"{self.mem_mb / 1024:.1f} GiB")
        return " · ".join(p for p in parts if p)


class Metric(_Event):
    type: Literal["metric"] = "metric"
    name: str
    value: float
    step: int | None = None


class Log(_Event):
    type: Literal["log"] = "log"
    level: Literal["debug", "info", "warning", "error"] = "info"
    message: str


class Artifact(_Event):
    type: Literal["artifact"] = "artifact"
    path: str
    sha256: str
    size: int
    kind: str = ""


class Error(_Event):
    type: Literal["error"] = "error"
    title: str
    message: str
    hint: str = ""


class Done(_Event):
    type: Literal["done"] = "done"
    result: dict[str, Any] = Field(default_factory=dict)


Event = Annotated[Progress | Metric | Log | Artifact | Error | Done, Field(discriminator="type")]
_adapter: TypeAdapter[Event] = TypeAdapter(Event)


def parse(line: str) -> Event:
    """Parse one line of events.jsonl (raises ValueError on a malformed line)."""
    try:
        return _adapter.validate_json(line)
    except ValidationError as exc:
        raise ValueError(f"not a valid event: {line[:200]!r}") from exc


class EventWriter:
    """Appends events to a job's events.jsonl, one flushed line each, throttling progress."""

    def __init__(self, path: Path, min_interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.path = path
        self.min_interval_s = min_interval_s
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 (lives with the writer)
        self._last_progress_t = 0.0
        self._pending: Progress | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, Progress):
            now = time.monotonic()
            if now - self._last_progress_t < self.min_interval_s:
                self._pending = event  # keep only the newest; written before the next other event
                return
            self._last_progress_t = now
            self._pending = None
        else:
            self._flush_pending()
        self._write(event)

    def _flush_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._write(pending)

    def _write(self, event: Event) -> None:
        self._file.write(event.model_dump_json(exclude_none=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._flush_pending()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_all(path: Path, offset: int = 0, end: int | None = None) -> list[Event]:
    """Every complete event in a file from byte `offset` on, up to byte `end` (a torn last line, from a
    killed writer, is skipped)."""
    if not path.exists():
        return []
    events = []
    with open(path, "rb") as handle:
        handle.seek(offset)
        text = handle.read(-1 if end is None else max(0, end - offset)).decode("utf-8", errors="replace")
    for line in text.splitlines():
        if line.strip():
            try:
                events.append(parse(line))
            except ValueError:
                continue
    return events


def follow(path: Path, poll_s: float = 0.1, offset: int = 0) -> Iterator[Event | None]:
    """Yield events as they are appended after byte `offset`, forever; yields None when there is
    nothing new, so the caller can check on the writer and stop by leaving the loop."""
    buffer = ""
    while True:
        if path.exists():
            with open(path, encoding="utf-8") as handle:
                handle.seek(offset)
                chunk = handle.read()
                offset = handle.tell()
            buffer += chunk
            *lines, buffer = buffer.split("\n")
            for line in lines:
                if line.strip():
                    try:
                        yield parse(line)
                    except ValueError:
                        continue
        yield None
        time.sleep(poll_s)


class Emitter:
    """What a stage gets to report with: typed helpers over an event sink, and the cancel flag.

    Stages call `check_cancelled()` at safe points (between steps, between files); when the job
    was asked to stop it raises `Cancelled`, and the stage's own cleanup runs as for any error.
    """

    def __init__(
        self, sink: Callable[[Event], None], cancelled: Callable[[], bool] = lambda: False
    ) -> None:
        self._sink = sink
        self._cancelled = cancelled

    def __call__(self, event: Event) -> None:
        self._sink(event)

    def progress(self, phase: str, step: int = 0, total: int | None = None, **fields: Any) -> None:
        self._sink(Progress(phase=phase, step=step, total=total, **fields))

    def log(self, message: str, level: Literal["debug", "info", "warning", "error"] = "info") -> None:
        self._sink(Log(level=level, message=message))

    def metric(self, name: str, value: float, step: int | None = None) -> None:
        self._sink(Metric(name=name, value=value, step=step))

    def artifact(self, path: Path, kind: str = "") -> str:
        """Hash a finished file and announce it; returns its sha256."""
        digest = sha256_file(path)
        self._sink(Artifact(path=str(path), sha256=digest, size=path.stat().st_size, kind=kind))
        return digest

    def cancelled(self) -> bool:
        """Whether the job was asked to stop (for stages that save before stopping)."""
        return self._cancelled()

    def check_cancelled(self) -> None:
        if self._cancelled():
            raise Cancelled("the job was cancelled", "Start it again when you are ready.")


def stop_on_signals() -> Callable[[], bool]:
    """SIGTERM and SIGINT set a flag instead of ending the process; the returned function reads it (a stage
    checks it at its safe points and stops there, saving first)."""
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return lambda: bool(received)
