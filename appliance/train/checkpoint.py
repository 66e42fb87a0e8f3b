"""Checkpoints that are complete or absent: written under a temporary name, renamed into place,
the last N kept. A checkpoint holds the adapter (or full weights), optimizer, scheduler, torch RNG
and the trainer state (step, epoch, position in the epoch, loss history)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from appliance.fsutil import atomic_write_text, fsync_dir

STATE = "trainer_state.json"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save(run_dir: Path, step: int, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
         keep: int) -> Path:
    import torch

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        model.save_pretrained(str(tmp / "model"), safe_serialization=True)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        atomic_write_text(tmp / STATE, json.dumps(state, indent=2) + "\n")  # last: marks it complete
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # left by a process killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_state(folder: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((folder / STATE).read_text(encoding="utf-8"))
    return state


def load_optimizer(folder: Path, optimizer: Any, scheduler: Any) -> None:
    import torch

    saved = torch.load(folder / "optimizer.pt", weights_only=True)  # plain tensors only, never code
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
