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
from collections.abc import Callable
from pathlib import Path

from appliance.errors import StoreError
from appliance.fsutil import sha256_file
from appliance.run import MERGE_RECORD, Run
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
    run = Run.at(run_dir)
    problems: list[str] = []
    problems += _record(run.config)
    problems += _check_data(run)
    for folder in checkpoint_folders(run):
        if (folder / "trainer_state.json").is_file():  # the marker a checkpoint writes last
            problems += _check_json(folder / "trainer_state.json")
            problems += _check_weights(folder / "model")
            if not (folder / "optimizer.safetensors").is_file():
                problems.append(f"{folder}: a registered checkpoint without its optimizer state")
            else:
                problems += _check_weights(folder, "optimizer.safetensors")
    if run.adapter_dir.exists():
        problems += _check_weights(run.adapter_dir)
    if run.merged_dir.exists():
        problems += _check_json(run.merged_dir / MERGE_RECORD)
        problems += _check_json(run.merged_dir / "config.json")
        problems += _check_weights(run.merged_dir)
    if run.gguf_dir.exists():
        problems += _check_gguf(run, run.gguf_dir)
    for folder in sorted(run.rejected_dir.iterdir()) if run.rejected_dir.is_dir() else []:
        problems += _check_gguf(run, folder)
    if run.eval_dir.is_dir():
        for path in sorted(run.eval_dir.glob("*.json")):
            problems += _check_json(path)
    if run.manifest_path.exists():
        problems += _record(run.manifest)
    return problems


def checkpoint_folders(run: Run) -> list[Path]:
    return sorted(run.checkpoints_dir.glob("step-*")) if run.checkpoints_dir.is_dir() else []


def _record(read: Callable[[], object]) -> list[str]:
    """A record read through the run: the sentence that names what is wrong with it, if anything."""
    try:
        read()
    except StoreError as exc:
        return [exc.message]
    return []


def _check_json(path: Path) -> list[str]:
    if not path.is_file():
        return [f"{path} is missing"]
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return [f"{path} is not complete JSON ({exc})"]
    return []


def _check_data(run: Run) -> list[str]:
    if not run.data_dir.exists():
        return []
    if not run.data_report_path.is_file():
        return [f"{run.data_report_path} is missing"]
    try:
        report = run.data_report()
    except StoreError as exc:
        return [exc.message]
    problems = []
    for name, output in (report.outputs if report is not None else {}).items():
        path = run.data_dir / Path(output.path or f"{name}.jsonl").name
        if output.sha256 is None:
            continue
        if not path.is_file():
            problems.append(f"{path}: listed in {run.data_report_path.name} but missing")
        elif sha256_file(path) != output.sha256:
            problems.append(f"{path}: its sha256 differs from the one {run.data_report_path.name} records")
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


def _check_gguf(run: Run, folder: Path) -> list[str]:
    try:
        record = run.verification(folder)
    except StoreError as exc:
        return [exc.message]
    if record is None:
        return [f"{folder}: the record of its files is missing"]
    problems = []
    for entry in record.files:
        path = folder / Path(entry.file).name
        if not path.is_file():
            problems.append(f"{path}: listed in its folder's verification record but missing")
        elif path.stat().st_size != entry.size_bytes:
            problems.append(f"{path}: {path.stat().st_size} bytes where the verification record says "
                            f"{entry.size_bytes}")
    return problems
