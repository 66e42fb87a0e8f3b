"""Checkpoints that are complete or absent: written under a temporary name, renamed into place,
the last N kept. A checkpoint holds the adapter (or full weights), optimizer, scheduler, torch RNG
and the trainer state (step, epoch, position in the epoch, loss history).

Like every weight file of the appliance, the optimizer state is safetensors, never a pickle: its
tensors go in the file, and the structure around them (param groups, scheduler counters) as JSON in
the file's metadata, so loading a checkpoint can never run code.

A checkpoint does not depend on how many processes wrote it: the weights are whole (gathered from
the shards under FSDP) and the optimizer state is keyed by the position of each trainable
parameter, the same in every layout, so a run may resume on another number of processes."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from appliance import faults
from appliance.fsutil import atomic_write_text, fsync_dir, replace_dir

if TYPE_CHECKING:
    from appliance.train.distributed import Group

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"


class TrainerState(BaseModel):
    """Where a training stands, written last into every checkpoint (`trainer_state.json`: its presence marks
    the checkpoint complete), so a resumed run continues its step count, data order and curves."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of the current epoch already trained on
    total_steps: int = 0
    losses: list[tuple[int, float]] = Field(default_factory=list)  # (step, training loss)
    evals: list[tuple[int, float]] = Field(default_factory=list)  # (step, validation loss)
    task_evals: list[tuple[int, float]] = Field(default_factory=list)  # (step, validation label accuracy)
    best_eval: float | None = None  # the best value early stopping has seen
    bad_evals: int = 0  # evaluations since it was last beaten
    real_tokens: int = 0
    seconds: float = 0.0  # training time so far, over every session of the run
    processes: int = 1  # how many processes wrote it (a resume may use another number)


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


def save(run_dir: Path, step: int, model: Any, optimizer: Any, scheduler: Any, state: TrainerState,
         keep: int, group: Group | None = None) -> Path | None:
    """Write checkpoint `step`; returns its folder, or None in a process that does not save (every process
    of a sharded run takes part in gathering, one writes)."""
    import torch

    weights = full_weights(model, group)
    optimizer_state = _optimizer_state(model, optimizer, group)
    if group is not None and not group.saves:
        group.barrier()
        return None
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        model.save_pretrained(str(tmp / "model"), safe_serialization=True, state_dict=weights)
        save_state(tmp / OPTIMIZER, {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                                     "torch_rng": torch.get_rng_state()})
        atomic_write_text(tmp / STATE, state.model_dump_json(indent=2) + "\n")  # last: marks it complete
        fsync_dir(tmp)
        faults.point("train.checkpoint.register")
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # left by a process killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    if group is not None:
        group.barrier()  # no rank runs ahead of a checkpoint being written
    return final


def _sharded(group: Group | None) -> bool:
    return group is not None and group.sharding == "fsdp" and group.wrapped is not None


def full_weights(model: Any, group: Group | None) -> dict[str, Any] | None:
    """The whole state dict of a sharded model, gathered (every rank takes part; the saving rank gets it);
    None when the model's own state dict is already whole."""
    if not _sharded(group):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    assert group is not None
    gathered = get_model_state_dict(group.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    prefix = "inner."  # the loss module around the model (distributed._loss_module)
    return {name.removeprefix(prefix): value for name, value in gathered.items()}


def _plain(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's wrapper (the state dict functions want the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _trainable_names(root: Any) -> list[str]:
    return [name for name, param in root.named_parameters() if param.requires_grad]


def _optimizer_state(model: Any, optimizer: Any, group: Group | None) -> dict[str, Any]:
    """The optimizer's state dict keyed by parameter position (what a single process writes)."""
    if not _sharded(group):
        return dict(optimizer.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    assert group is not None
    keyed = get_optimizer_state_dict(group.wrapped, _plain(optimizer),
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return by_position(keyed, _trainable_names(group.wrapped)) if keyed else {}


def by_position(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter name (torch.distributed.checkpoint's form) re-keyed by the
    parameter's position among the trainable ones (torch.optim's own form)."""
    index = {name: position for position, name in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state.get("param_groups", [])]
    return {"state": {index[name]: value for name, value in state.get("state", {}).items()}, "param_groups": groups}


def by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of `by_position`."""
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state.get("param_groups", [])]
    return {"state": {names[int(i)]: value for i, value in state.get("state", {}).items()}, "param_groups": groups}


def load_state(folder: Path) -> TrainerState:
    return TrainerState.model_validate_json((folder / STATE).read_text(encoding="utf-8"))


def load_optimizer(folder: Path, optimizer: Any, scheduler: Any, group: Group | None = None) -> None:
    import torch

    saved = load_state_file(folder / OPTIMIZER)
    if _sharded(group):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        assert group is not None
        set_optimizer_state_dict(group.wrapped, _plain(optimizer),
                                 by_name(saved["optimizer"], _trainable_names(group.wrapped)),
                                 options=StateDictOptions(full_state_dict=True))
    else:
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
