"""What the screens of one run share: the run they show and its folder."""

from __future__ import annotations

from pathlib import Path

from textual.screen import Screen


class RunScreen(Screen[None]):
    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id

    @property
    def run_dir(self) -> Path:
        return self.app.store.runs_dir / self.run_id  # type: ignore[attr-defined,no-any-return]
