"""Is a run's folder consistent? Every registered artifact complete, every record agreeing with its files.

Stages build their outputs under hidden names and rename them into place when complete, so a job
killed at any moment leaves a consistent run plus litter (hidden temporary entries). `check_run`
says whether that holds, naming each file that breaks it; `sweep_litter` removes the litter, and
`jobs.start` calls it under the run's lock, when no job of that run can still be writing.
No ML imports: the TUI, the CLI and the chaos bench use this.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from appliance.errors import StoreError
from appliance.fsutil import sha256_file
from appliance.safetensors_meta import check_complete

# Hidden entries that are ours and not litter.
KEEP = frozenset({".job.lock"})
# The folders of a run whose hidden entries can only be temporary: the run itself (staging folders, run.yaml
# being written), checkpoints/ (one being saved) and eval/ (results being written). Folders that were staged
# whole (data/, gguf/, merged/, adapter/) keep what they hold: gguf/.convert.log is the converter's record.
_SWEPT = ("", "checkpoints", "eval")


def litter(run_dir: Path) -> list[Path]:
    """Hidden temporary entries left in a run by jobs that were killed while writing."""
    found: list[Path] = []
    for sub in _SWEPT:
        folder = run_dir / sub if sub else run_dir
        if folder.is_dir() and not folder.is_symlink():
            found += sorted(p for p in folder.iterdir() if p.name.startswith(".") and p.name not in KEEP)
    return found


def sweep_litter(run_dir: Path) -> list[Path]:
    """Remove the litter; call only while holding the run's job lock."""
    removed = litter(run_dir)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def check_run(run_dir: Path) -> list[str]:
    """Every inconsistency in a run, one sentence each naming the file ([] when consistent).
    Litter is not an inconsistency: nothing registered points at it."""
    problems: list[str] = []
    problems += _check_yaml(run_dir / "run.yaml")
    problems += _check_data(run_dir / "data")
    for folder in sorted((run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else []:
        if (folder / "trainer_state.json").is_file():  # the marker a checkpoint writes last
            problems += _check_json(folder / "trainer_state.json")
            problems += _check_weights(folder / "model")
            if not (folder / "optimizer.safetensors").is_file():
                problems.append(f"{folder}: a registered checkpoint without its optimizer state")
            else:
                problems += _check_weights(folder, "optimizer.safetensors")
    if (run_dir / "adapter").exists():
        problems += _check_weights(run_dir / "adapter")
    if (run_dir / "merged").exists():
        problems += _check_json(run_dir / "merged" / "merge.json")
        problems += _check_json(run_dir / "merged" / "config.json")
        problems += _check_weights(run_dir / "merged")
    for name in ("gguf", "gguf-rejected"):
        if (run_dir / name).exists():
            problems += _check_gguf(run_dir / name)
    if (run_dir / "eval").is_dir():
        for path in sorted((run_dir / "eval").glob("*.json")):
            problems += _check_json(path)
    if (run_dir / "manifest.json").exists():
        problems += _check_json(run_dir / "manifest.json")
    return problems


def _check_yaml(path: Path) -> list[str]:
    if not path.exists():
        return []
    from appliance.store import Store

    try:
        Store.run_config(path.parent)
    except StoreError as exc:
        return [exc.message]
    return []


def _load_json(path: Path) -> tuple[Any, list[str]]:
    if not path.is_file():
        return None, [f"{path} is missing"]
    try:
        return json.loads(path.read_text(encoding="utf-8")), []
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, [f"{path} is not complete JSON ({exc})"]


def _check_json(path: Path) -> list[str]:
    return _load_json(path)[1]


def _check_data(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    report, problems = _load_json(folder / "data_report.json")
    if problems:
        return problems
    for name, output in (report.get("outputs") or {}).items():
        expected = output.get("sha256") if isinstance(output, dict) else None
        path = folder / str(output.get("path") or f"{name}.jsonl") if isinstance(output, dict) else folder
        if expected is None:
            continue
        if not path.is_file():
            problems.append(f"{path}: listed in data_report.json but missing")
        elif sha256_file(path) != expected:
            problems.append(f"{path}: its sha256 differs from the one data_report.json records")
    return problems


def _check_weights(folder: Path, pattern: str = "*.safetensors") -> list[str]:
    files = sorted(folder.glob(pattern))
    if not files:
        return [f"{folder}: no safetensors weights"]
    problems = []
    for path in files:
        try:
            check_complete(path)
        except StoreError as exc:
            problems.append(exc.message)
    return problems


def _check_gguf(folder: Path) -> list[str]:
    record, problems = _load_json(folder / "verification.json")
    if problems:
        return problems
    for entry in record.get("files") or []:
        path = folder / Path(str(entry.get("file", ""))).name
        if not path.is_file():
            problems.append(f"{path}: listed in verification.json but missing")
        elif entry.get("size_bytes") is not None and path.stat().st_size != entry["size_bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes where verification.json records "
                            f"{entry['size_bytes']}")
    return problems
