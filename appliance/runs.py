"""What each run holds and where it stands, read from its folder alone (no ML imports).

The TUI's Home screen shows this: which stages a run has completed (data, train, export, eval), the
stage of its last job and whether that job is running, finished, failed or was stopped, and the
headline figure when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from appliance import events as ev
from appliance import jobs
from appliance.errors import StoreError
from appliance.run import JOB_FILE, Run
from appliance.store import Store

State = Literal["running", "done", "failed", "stopped", "idle"]
STAGES = ("data", "train", "export", "eval")


@dataclass
class RunSummary:
    id: str
    path: Path
    modified: float
    task: str | None = None
    base_model: str | None = None
    stages: list[str] = field(default_factory=list)  # completed: data, train, export, eval
    job: str | None = None  # stage of the last job started in the run
    state: State = "idle"
    detail: str = ""  # the last job's error, or what it is doing
    headline: str | None = None  # e.g. "tuned accuracy 95.2"

    @property
    def next_stage(self) -> str | None:
        return next((stage for stage in STAGES if stage not in self.stages), None)


def summarize(run: Run) -> RunSummary:
    summary = RunSummary(id=run.id, path=run.path, modified=_modified(run))
    summary.base_model = run.base_model_name()
    done = {"data": run.prepared, "train": run.trained, "export": run.exported, "eval": run.evaluated}
    summary.stages = [stage for stage in STAGES if done[stage]]
    try:
        report = run.data_report()
        summary.task = report.task if report is not None else run.settings("data").get("task")
        comparison = run.comparison()
    except StoreError:
        comparison = None  # a status view shows what is there; the stage that reads it explains the damage
    summary.headline = comparison.headline if comparison is not None else None
    _last_job(run, summary)
    return summary


def list_runs(store: Store, limit: int | None = None) -> list[RunSummary]:
    """The store's runs, most recently changed first."""
    runs = [summarize(run) for run in store.runs()]
    runs.sort(key=lambda r: r.modified, reverse=True)
    return runs[:limit] if limit else runs


def _last_job(run: Run, summary: RunSummary) -> None:
    job = jobs.attach(run.path)
    if job is None:
        return
    summary.job = job.stage
    events = job.events()
    final = next((e for e in reversed(events) if isinstance(e, ev.Error | ev.Done)), None)
    if isinstance(final, ev.Done):
        summary.state = "done"
    elif isinstance(final, ev.Error):
        summary.state = "stopped" if final.title == "Cancelled" else "failed"
        summary.detail = final.message
    elif job.running():
        summary.state = "running"
        progress = next((e for e in reversed(events) if isinstance(e, ev.Progress)), None)
        if progress is not None:
            summary.detail = progress.phase + (f" {progress.step}/{progress.total}" if progress.total else "")
    else:
        summary.state = "failed"
        summary.detail = "the job's process ended without reporting why"


def _modified(run: Run) -> float:
    stamps = [p.stat().st_mtime for p in (run.path, run.events_path, run.path / JOB_FILE) if p.exists()]
    return max(stamps)
