"""What each run holds and where it stands, read from its folder alone (no ML imports).

The TUI's Home screen and `appliance runs` show this: which stages a run has completed (data,
train, export, eval), the stage of its last job and whether that job is running, finished,
failed or was stopped, and the headline figure when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from appliance import events as ev
from appliance import jobs
from appliance.errors import StoreError
from appliance.fsutil import read_json_object
from appliance.store import Store

State = Literal["running", "done", "failed", "stopped", "idle"]


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
        for stage in ("data", "train", "export", "eval"):
            if stage not in self.stages:
                return stage
        return None


def summarize(run_dir: Path) -> RunSummary:
    summary = RunSummary(id=run_dir.name, path=run_dir, modified=_modified(run_dir))
    config = _config(run_dir)
    summary.task = (config.get("data") or {}).get("task")
    summary.base_model = (config.get("train") or {}).get("base_model") or (config.get("data") or {}).get("model")
    if (run_dir / "data" / "data_report.json").is_file():
        summary.stages.append("data")
    if (run_dir / "adapter").is_dir():
        summary.stages.append("train")
    if (run_dir / "gguf" / "verification.json").is_file():
        summary.stages.append("export")
    comparison = read_json_object(run_dir / "eval" / "comparison.json")
    if comparison:
        summary.stages.append("eval")
        summary.headline = _headline(comparison)
    _last_job(run_dir, summary)
    return summary


def list_runs(store: Store, limit: int | None = None) -> list[RunSummary]:
    """The store's runs, most recently changed first."""
    if not store.runs_dir.is_dir():
        return []
    runs = [summarize(d) for d in store.runs_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    runs.sort(key=lambda r: r.modified, reverse=True)
    return runs[:limit] if limit else runs


def _last_job(run_dir: Path, summary: RunSummary) -> None:
    job = jobs.attach(run_dir)
    if job is None:
        return
    summary.job = job.stage
    events = ev.read_all(job.events_path, job.offset)
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


def _headline(comparison: dict[str, Any]) -> str | None:
    primary = comparison.get("primary")
    for row in comparison.get("targets") or []:
        if row.get("target") == "tuned" and isinstance(row.get("score"), dict):
            return f"tuned {primary} {row['score']['point'] * 100:.1f}"
    return None


def _modified(run_dir: Path) -> float:
    stamps = [p.stat().st_mtime for p in (run_dir, run_dir / ev.EVENTS_FILE, run_dir / jobs.JOB_FILE) if p.exists()]
    return max(stamps)


def _config(run_dir: Path) -> dict[str, Any]:
    try:
        return Store.run_config(run_dir)
    except StoreError:
        return {}  # a status view shows what is there; the stage that reads it explains the damage
