"""What the screens of one run share: the run they show and its folder, and starting its jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel
from textual.screen import Screen

from appliance import jobs
from appliance.errors import ApplianceError


class RunScreen(Screen[None]):
    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id

    @property
    def run_dir(self) -> Path:
        return self.app.store.runs_dir / self.run_id  # type: ignore[attr-defined,no-any-return]

    def start_job(self, stage: str, cfg: BaseModel, record: dict[str, Any] | None = None) -> jobs.Job | None:
        """Start a stage on this run; None (with the reason on screen) when it cannot start, e.g. while
        another job of the run is still running."""
        try:
            return jobs.start(stage, self.run_dir, cfg, record=record)
        except ApplianceError as exc:
            self.notify(f"{exc.message}\n{exc.hint}", title=exc.title, severity="error", timeout=12)
            return None
