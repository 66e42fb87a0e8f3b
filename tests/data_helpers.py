"""Helpers for the data tests: run the data stage in-process on files written by the test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from appliance import events as ev
from appliance.config import DataConfig
from appliance.data import prepare
from appliance.run import Run


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_prepare(run_dir: Path, store: Path, inputs: list[Path], **options: Any) -> tuple[dict[str, Any], list[Any]]:
    """Run the stage; returns the report and the events it emitted."""
    options.setdefault("templating", False)
    options.setdefault("near_dup", False)
    cfg = DataConfig(inputs=[str(p) for p in inputs], store=str(store), **options)
    events: list[ev.Event] = []
    prepare.run(cfg, run_dir, ev.Emitter(events.append))
    report = Run.at(run_dir).require_data_report().model_dump(mode="json")
    return report, events


def split_rows(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: [json.loads(line) for line in (run_dir / "data" / f"{name}.jsonl").read_text().splitlines()]
            for name in ("train", "val", "test")}


def assert_accounted(report: dict[str, Any]) -> None:
    counts = report["counts"]
    parts = ("invalid", "pii_dropped", "duplicates_exact", "duplicates_near", "train", "val", "test")
    assert sum(counts[k] for k in parts) == counts["rows_read"], counts
