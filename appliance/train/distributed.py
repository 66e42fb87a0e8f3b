"""Training on several processes, GPUs or machines, through Hugging Face accelerate.

We do not run a distributed system of our own: `accelerate launch` (torchrun underneath) starts
the processes and the collectives are torch.distributed's (NCCL on GPUs, gloo on CPUs). What this
module adds is what makes such a run an appliance job:

- `launch` runs inside the train job's worker. It writes the run's accelerate configuration
  (`accelerate.yaml`), starts the launcher with the egress guard on, turns the ranks' event files
  into the job's one progress stream (rank 0's progress, every rank's warnings and errors), passes
  a cancel on to every rank, and explains how the run ended. The ranks die with the job: each
  process of the tree is killed by the kernel when its parent goes (PR_SET_PDEATHSIG), so a killed
  job leaves no training behind that could write into its run.
- `Group` is what a rank trains with: which micro-batches are its own (the data order is the one
  of a single process, cut across ranks, so a run may resume with another number of processes),
  sums and maxima over all ranks, the wrapped model (DDP or FSDP), and who saves.

One global step is `grad_accum x world_size` micro-batches of `batch_size` rows. Every rank counts
the answer tokens of the whole step, scales its own loss by `world_size / tokens`, and the
all-reduce (a mean) leaves the gradient a single process would have computed for the same rows.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from appliance import events as ev
from appliance.config import TrainConfig
from appliance.errors import ApplianceError, Cancelled
from appliance.fsutil import atomic_write_text

RANKS_DIR = "ranks"  # the ranks' own event files, the spec they start from, the stop request
ACCELERATE_FILE = "accelerate.yaml"
SPEC_FILE = "spec.json"
STOP_FILE = "stop"
RANK_ENV = "APPLIANCE_RANK_OF"  # set in the ranks: the run they train
PEER_ENV = "APPLIANCE_CLUSTER_PEER"  # the main node's host, the one address a multi-node run may reach
PR_SET_PDEATHSIG = 1

T = TypeVar("T")


class DistributedError(ApplianceError):
    title = "Distributed training problem"


def wanted(cfg: TrainConfig) -> bool:
    """Whether the run trains through accelerate: several processes, or sharding asked for (FSDP on one
    GPU runs the same launch path as on many)."""
    return cfg.world_size > 1 or cfg.sharding == "fsdp"


def in_rank() -> bool:
    """True inside a process started by `launch` (it trains; it does not launch again)."""
    return bool(os.environ.get(RANK_ENV))


def die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent ends (Linux); a no-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def rank_file(run_dir: Path, rank: int) -> Path:
    return run_dir / RANKS_DIR / f"rank-{rank}.jsonl"


# --- the launching side: the train job's worker -------------------------------------------------


def accelerate_config(cfg: TrainConfig, cuda: bool, port: int, layer_classes: list[str]) -> dict[str, Any]:
    """The accelerate configuration of this run (what `accelerate config` would ask for)."""
    host = "127.0.0.1"
    if cfg.main_address is not None:
        host, _, port_text = cfg.main_address.rpartition(":")
        port = int(port_text)
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP" if cfg.sharding == "fsdp" else "MULTI_GPU",
        "num_processes": cfg.world_size,  # accelerate counts every process of every machine
        "num_machines": cfg.nodes,
        "machine_rank": cfg.node_rank,
        "main_process_ip": host,
        "main_process_port": port,
        "rdzv_backend": "static",
        "same_network": True,
        "gpu_ids": "all",
        "mixed_precision": "no",  # the base model's dtype is the run's own setting (TrainConfig.dtype)
        "use_cpu": False,  # on a CPU the ranks ask for it themselves: accelerate then takes gloo
        "main_training_function": "main",
        "downcast_bf16": "no",
        "tpu_env": [],
    }
    if cfg.sharding == "fsdp":
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": ",".join(layer_classes),
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_offload_params": False,
            "fsdp_cpu_ram_efficient_loading": False,
            "fsdp_activation_checkpointing": False,  # the run's gradient_checkpointing does it inside the model
            "fsdp_use_orig_params": True,
        }
    return config


def _yaml(config: dict[str, Any]) -> str:
    import yaml

    return "# written by `appliance train` for this run; `accelerate launch --config_file` reads it\n" + \
        yaml.safe_dump(config, sort_keys=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _layer_classes(model_dir: Path) -> list[str]:
    """The decoder layer class of the base model (what FSDP wraps one unit at a time)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    names = [a.removesuffix("ForCausalLM") + "DecoderLayer" for a in architectures if a.endswith("ForCausalLM")]
    return names or ["LlamaDecoderLayer"]


def _rank_env(cfg: TrainConfig, run_dir: Path, cuda: bool) -> dict[str, str]:
    env = dict(os.environ)
    env[RANK_ENV] = str(run_dir)
    if cfg.nodes > 1 and cfg.main_address is not None:
        env[PEER_ENV] = cfg.main_address.rpartition(":")[0].strip("[]")
    if not cuda:  # share the cores: a group of cores per process, not every process on every core
        threads = env.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // cfg.processes))
        env["OMP_NUM_THREADS"] = threads
        env.setdefault("MKL_NUM_THREADS", threads)  # torch's matrix products: more threads than cores spin
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass
class _Follower:
    """Reads every rank's event file and forwards what the job's own stream should carry."""

    run_dir: Path
    ranks: range  # the ranks of this node; the first one's progress is the job's
    emit: ev.Emitter
    streams: dict[int, Iterator[ev.Event | None]] = field(default_factory=dict)
    started: set[int] = field(default_factory=set)  # ranks that have said anything
    errors: list[tuple[int, ev.Error]] = field(default_factory=list)
    result: dict[str, Any] | None = None

    def poll(self) -> None:
        for rank in self.ranks:
            stream = self.streams.setdefault(rank, ev.follow(rank_file(self.run_dir, rank), poll_s=0))
            for event in stream:
                if event is None:  # nothing more for now
                    break
                self.started.add(rank)
                self._forward(rank, event)

    def _forward(self, rank: int, event: ev.Event) -> None:
        leader = rank == self.ranks[0]
        if isinstance(event, ev.Done):
            if leader:
                self.result = event.result
        elif isinstance(event, ev.Error):
            self.errors.append((rank, event))
        elif leader:
            self.emit(event)
        elif isinstance(event, ev.Log) and event.level in ("warning", "error"):
            self.emit.log(f"rank {rank}: {event.message}", event.level)


def launch(cfg: TrainConfig, run_dir: Path, model_dir: Path, emit: ev.Emitter) -> dict[str, Any]:
    """Run the training on `cfg.processes` processes of this node (one node of `cfg.nodes`) and return
    the result of this node's first rank. Runs in the train job's worker, which holds the run's lock throughout."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda and cfg.processes > torch.cuda.device_count():
        raise DistributedError(f"{cfg.processes} processes asked for, but this machine has "
                               f"{torch.cuda.device_count()} GPU(s)",
                               f"Use --processes {torch.cuda.device_count()} (one process per GPU).")
    if not cuda and cfg.method == "qlora":
        raise DistributedError("qlora loads the base in 4-bit, which needs CUDA GPUs", "Use --method lora here.")
    if not cuda and cfg.sharding == "fsdp" and cfg.world_size == 1:
        raise DistributedError("sharding over one CPU process shards nothing",
                               "Use --processes 2 or more with --sharding fsdp, or leave --sharding at ddp.")
    ranks = run_dir / RANKS_DIR
    shutil.rmtree(ranks, ignore_errors=True)
    ranks.mkdir(parents=True)
    config = accelerate_config(cfg, cuda, _free_port(), _layer_classes(model_dir))
    atomic_write_text(run_dir / ACCELERATE_FILE, _yaml(config))
    atomic_write_text(ranks / SPEC_FILE, json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
    where = f"node {cfg.node_rank} of {cfg.nodes}, " if cfg.nodes > 1 else ""
    emit.log(f"training on {cfg.world_size} processes ({where}{cfg.processes} here, "
             f"{'GPUs' if cuda else 'CPU, gloo'}, {cfg.sharding.upper()}) through accelerate; configuration in "
             f"{run_dir / ACCELERATE_FILE}")
    command = [sys.executable, "-m", "appliance.train.agent", "--config_file", str(run_dir / ACCELERATE_FILE),
               "--module", "appliance.train.rank", str(run_dir)]
    here = range(cfg.node_rank * cfg.processes, (cfg.node_rank + 1) * cfg.processes)
    follower = _Follower(run_dir, here, emit)
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=_rank_env(cfg, run_dir, cuda),
                               preexec_fn=die_with_parent)
    stop_asked = False
    try:
        while process.poll() is None:
            follower.poll()
            if emit.cancelled() and not stop_asked:
                stop_asked = True
                (ranks / STOP_FILE).touch()  # every rank stops at the same step boundary, after saving
            time.sleep(0.2)
    finally:
        if process.poll() is None:  # this worker is being torn down: the ranks go with it
            process.kill()
            process.wait()
    follower.poll()
    return _outcome(process.returncode, follower, cfg)


def _outcome(returncode: int, follower: _Follower, cfg: TrainConfig) -> dict[str, Any]:
    if returncode == 0 and follower.result is not None:
        return follower.result
    if follower.errors:
        # the first to fail, by time: the others mostly fail because it did (a closed connection)
        rank, first = min(follower.errors, key=lambda item: (item[1].title == Cancelled.title, item[1].t))
        if all(error.title == Cancelled.title for _rank, error in follower.errors):
            raise Cancelled(first.message, first.hint)
        others = len({r for r, _ in follower.errors} - {rank})
        tail = f" ({others} other rank(s) stopped with it)" if others else ""
        raise DistributedError(f"rank {rank}: {first.title}: {first.message}{tail}", first.hint)
    if cfg.nodes > 1 and not follower.started:
        raise DistributedError(f"the processes of this node never started training (launcher status {returncode})",
                               f"Check that node 0 runs the same command and that {cfg.main_address} is reachable "
                               "from here; job.log shows the launcher's own messages.")
    raise DistributedError(f"a training process ended without reporting why (the launcher stopped the others "
                           f"and ended with status {returncode}): killed, probably out of memory",
                           "Lower the batch size or sequence length, or use fewer processes per machine; job.log "
                           "names the process and its exit code, and `dmesg | grep -i oom` shows whether the "
                           "kernel's OOM killer stopped it. The last checkpoint is kept for --resume.")


# --- the training side: one rank -----------------------------------------------------------------


@dataclass
class Group:
    """The processes training together, as one rank sees them. `Group()` is a single process."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    sharding: str = "ddp"
    accelerator: Any = None
    wrapped: Any = None  # the model as the collectives see it (DDP or FSDP), once `wrap` ran

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def saves(self) -> bool:
        """Who writes checkpoints and the adapter: under DDP every node's first process (each node keeps
        its own copy of the run), under FSDP rank 0, which gathers the shards."""
        return self.local_rank == 0 if self.sharding == "ddp" else self.rank == 0

    @classmethod
    def start(cls, cfg: TrainConfig) -> Group:
        """Join the run's process group through accelerate (in a rank), or a single process."""
        if not wanted(cfg) or not in_rank():
            return cls()
        import torch
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        if accelerator.num_processes != cfg.world_size:
            raise DistributedError(f"accelerate started {accelerator.num_processes} processes, the run asks for "
                                   f"{cfg.world_size}", "Check accelerate.yaml in the run folder.")
        return cls(world=accelerator.num_processes, rank=accelerator.process_index,
                   local_rank=accelerator.local_process_index, sharding=cfg.sharding, accelerator=accelerator)

    @property
    def device(self) -> Any:
        return self.accelerator.device if self.accelerator is not None else None

    def share(self, items: list[T]) -> list[T | None]:
        """This rank's items of a step (every `world`-th), padded with None so that every rank takes as many
        turns: a rank without an item of its own still joins each collective, with a weight of zero."""
        turns = math.ceil(len(items) / self.world)
        mine: list[T | None] = list(items[self.rank::self.world])
        return mine + [None] * (turns - len(mine))

    def sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, "sum")

    def max(self, values: list[float]) -> list[float]:
        return self._reduce(values, "max")

    def _reduce(self, values: list[float], op: str) -> list[float]:
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return [float(v) for v in tensor.tolist()]

    def same_everywhere(self, text: str, what: str) -> None:
        """Refuse to train when the ranks disagree on `text` (e.g. the data on different nodes)."""
        if self.world == 1:
            return
        import hashlib

        digest = int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)
        low, high = self.max([-digest, digest])
        if -low != high:
            raise DistributedError(f"the processes of this run do not have the same {what}",
                                   "Every node must hold the same prepared data and settings: prepare the data "
                                   "from the same files, or copy the run folder to every node.")

    def wrap(self, model: Any, optimizer: Any) -> tuple[Callable[[dict[str, Any]], Any], Any]:
        """The function a training step calls for each micro-batch's per-row answer loss (through DDP or FSDP
        when distributed, so that the backward pass reduces the gradients), and the optimizer to step (under
        FSDP, one over the sharded parameters)."""
        from appliance.modeling import answer_nll

        if self.accelerator is None:
            return (lambda batch: answer_nll(model, batch)), optimizer
        loss_module = _loss_module(model)
        if self.sharding != "fsdp":
            self.wrapped = self.accelerator.prepare(loss_module)
        elif self.device.type == "cuda":  # accelerate's FSDP2 shards the model and moves the optimizer onto it
            self.wrapped, optimizer = self.accelerator.prepare(loss_module, optimizer)
        else:  # accelerate shards only across accelerators: on CPUs, the same FSDP2 calls, made here
            self.wrapped = _fully_shard(loss_module, self.world)
            (only,) = optimizer.param_groups  # no step taken yet: point it at the sharded parameters
            only["params"] = [p for p in model.parameters() if p.requires_grad]
        wrapped = self.wrapped
        return (lambda batch: wrapped(batch)), optimizer

    @contextlib.contextmanager
    def no_sync(self, last: bool) -> Iterator[None]:
        """Gradient accumulation: reduce across ranks only on the last micro-batch of a step."""
        if self.world == 1 or last or self.wrapped is None:
            yield
        elif hasattr(self.wrapped, "set_requires_gradient_sync"):  # FSDP2
            self.wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.wrapped.set_requires_gradient_sync(True)
        elif hasattr(self.wrapped, "no_sync"):  # DDP
            with self.wrapped.no_sync():
                yield
        else:
            yield

    def clip(self, params: list[Any], max_norm: float) -> None:
        import torch

        if self.accelerator is not None and self.wrapped is not None:
            self.accelerator.clip_grad_norm_(self.wrapped.parameters(), max_norm)
        else:
            torch.nn.utils.clip_grad_norm_(params, max_norm)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def end(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _fully_shard(module: Any, world: int) -> Any:
    """FSDP2 over the CPU processes: each decoder layer a unit of its own, then the root (embeddings, norm,
    head), as accelerate's transformer-based wrap does on GPUs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    inner = module.inner.get_base_model() if hasattr(module.inner, "get_base_model") else module.inner
    layer_names = set(getattr(inner, "_no_split_modules", None) or [])
    mesh = init_device_mesh("cpu", (world,))
    for sub in module.modules():
        if type(sub).__name__ in layer_names or (not layer_names and type(sub).__name__.endswith("DecoderLayer")):
            fully_shard(sub, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def _loss_module(model: Any) -> Any:
    """The model with the answer loss as its forward (DDP and FSDP hook into a module's forward)."""
    import torch

    from appliance.modeling import answer_nll

    class AnswerLoss(torch.nn.Module):  # type: ignore[misc]
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, batch: dict[str, Any]) -> Any:
            return answer_nll(self.inner, batch)

    return AnswerLoss(model)
