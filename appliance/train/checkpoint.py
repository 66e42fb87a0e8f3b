"""Checkpoints that are complete or absent: written under a temporary name, renamed into place,
the last N kept. A checkpoint holds the adapter (or full weights), optimizer, scheduler, torch RNG
and the trainer state (step, epoch, position in the epoch, loss history).

Like every weight file of the appliance, the optimizer state is safetensors, never a pickle: its
tensors go in the file, and the structure around them (param groups, scheduler counters) as JSON in
the file's metadata, so loading a checkpoint can never run code."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from appliance import faults
from appliance.fsutil import atomic_write_text, fsync_dir

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"


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
        save_state(tmp / OPTIMIZER, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                     "torch_rng": torch.get_rng_state()})
        atomic_write_text(tmp / STATE, json.dumps(state, indent=2) + "\n")  # last: marks it complete
        fsync_dir(tmp)
        faults.point("train.checkpoint.register")
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

    saved = load_state_file(folder / OPTIMIZER)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])


def save_state(path: Path, state: Any) -> None:
    """Nested dicts, lists, tuples, numbers, strings and tensors, as one safetensors file."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    layout = _encode(state, tensors)
    save_file(tensors, str(path), metadata={"layout": json.dumps(layout)})


def load_state_file(path: Path) -> Any:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        layout = json.loads((handle.metadata() or {})["layout"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    return _decode(layout, tensors)


def _encode(value: Any, tensors: dict[str, Any]) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot keep a {type(value).__name__} in a checkpoint")


def _decode(value: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__dict__"]}
    return value
