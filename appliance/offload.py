"""How much of a GGUF model llama.cpp puts on the GPU, planned before it loads.

Every llama.cpp user (the export's gate, evaluation, chat, the endpoint) asks `for_gguf` for its
`n_gpu_layers`. With a runtime built for the CPU, or no GPU, that is 0 and says why. Otherwise the
model's layers go to the GPU as far as its free memory allows, after what llama.cpp itself needs there
(its CUDA context and compute buffers) and after the room a training job running on the same card has
planned but not yet taken (its `planned_peak_mb` less what it holds now): a model that fits goes whole
(`-1`, the output layer too), one that does not goes in part, and the sentence says what was left where.

What one offloaded layer costs: its weights at the file's precision plus its share of the KV cache (llama.cpp
keeps each layer's cache on that layer's device). The output layer (the vocabulary projection) goes to the GPU
only with all the layers; the token embeddings always stay in RAM.

The GPUs are the ones the runtime itself sees (ggml's devices: CUDA_VISIBLE_DEVICES applies, and a driver too
old for the runtime's CUDA shows none). With several, the model goes to the one with the most free memory alone
(llama.cpp would otherwise spread it over all of them, the card a training uses too); the room kept for a
training is taken off that card's free memory, since which card a training uses is not known here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

MB = 1024 * 1024
# llama.cpp's own use of a CUDA device: the context of its process (kernels and cuBLAS handles) and the
# compute buffer of one 512-token batch beyond its logits. Not fitted on a GPU yet (BENCHMARKS.md: the GPU
# check); these are what llama.cpp reports at load for 1-8B models with CUDA 12-13.
CUDA_CONTEXT_MB = 400.0
COMPUTE_BUFFER_MB = 256.0
BATCH = 512  # the batch llama.cpp evaluates a prompt in; its logits are float32 per vocabulary entry
SHARE = 0.95  # of the free memory an offload plans to take


SPLIT_MODE_NONE = 0  # llama.cpp's LLAMA_SPLIT_MODE_NONE: the whole model on main_gpu


@dataclass(frozen=True)
class Offload:
    n_gpu_layers: int  # llama.cpp's setting: 0 all on the CPU, -1 every layer and the output
    layers: int  # of the model's
    vram_mb: float  # planned on the GPU
    reason: str  # in words, for the job's log and the doctor
    cpu_share: float = 1.0  # of the file's weights (and of the KV cache) that stays in RAM
    main_gpu: int | None = None  # the runtime's GPU it goes to, when it sees several

    @property
    def on_gpu(self) -> bool:
        return self.n_gpu_layers != 0

    def llama_settings(self) -> dict[str, int]:
        """The keyword arguments of llama_cpp.Llama (and of its server's model settings) that place the model."""
        settings = {"n_gpu_layers": self.n_gpu_layers}
        if self.main_gpu is not None and self.on_gpu:
            settings.update(split_mode=SPLIT_MODE_NONE, main_gpu=self.main_gpu)
        return settings


def plan(config: dict[str, Any], file_mb: float, context: int, gpu_free_mb: float | None, has_cuda: bool,
         reserve_mb: float = 0.0, reserved_by: str = "") -> Offload:
    """The layers of a model (its config.json, or what `pipeline_plan.config_from_gguf` reads from the file)
    that fit `gpu_free_mb` less `reserve_mb`, with `context` tokens of KV cache."""
    from appliance import pipeline_plan, planner

    config = pipeline_plan.text_config(config)
    layers = int(config["num_hidden_layers"])
    if not has_cuda:
        return Offload(0, layers, 0.0, "the llama.cpp runtime was built for the CPU (./install.sh --gpu builds "
                                       "it with CUDA)")
    if gpu_free_mb is None:
        return Offload(0, layers, 0.0, "no GPU is visible")
    params = max(1, planner.model_params(config))
    bytes_per_weight = file_mb * MB / params
    vocab, hidden = int(config["vocab_size"]), int(config["hidden_size"])
    layer_mb = planner.layer_params(config) * bytes_per_weight / MB
    kv_layer_mb = pipeline_plan.kv_bytes_per_token(config) * context / layers / MB
    output_mb = vocab * hidden * bytes_per_weight / MB
    fixed = CUDA_CONTEXT_MB + COMPUTE_BUFFER_MB + BATCH * vocab * 4 / MB
    budget = gpu_free_mb * SHARE - reserve_mb
    whole = fixed + layers * (layer_mb + kv_layer_mb) + output_mb
    room = (f"{gib(gpu_free_mb)} free" + (f", {gib(reserve_mb)} of it kept for {reserved_by}" if reserve_mb else ""))
    if whole <= budget:
        share = max(0.0, 1 - (layers * layer_mb + output_mb) / file_mb) if file_mb else 0.0
        return Offload(-1, layers, whole, f"all {layers} layers on the GPU ({gib(whole)} planned, {room})", share)
    fitting = int((budget - fixed) // (layer_mb + kv_layer_mb)) if budget > fixed else 0
    fitting = max(0, min(layers - 1, fitting))
    if fitting == 0:
        return Offload(0, layers, 0.0, f"on the CPU: not one layer fits the GPU beside llama.cpp's own "
                                       f"{gib(fixed)} ({room}; the whole model needs {gib(whole)})")
    used = fixed + fitting * (layer_mb + kv_layer_mb)
    return Offload(fitting, layers, used, f"{fitting} of {layers} layers on the GPU, the rest on the CPU "
                                          f"({gib(used)} planned, {room}; the whole model needs {gib(whole)})",
                   1 - fitting / layers)


def gib(mb: float) -> str:
    return f"{mb / 1024:.1f} GiB"


def for_gguf(path: Path, context: int) -> Offload:
    """`plan` for a GGUF file on this machine: its header, the runtime's backends and GPUs with their free memory,
    and the training jobs running on them."""
    from appliance import gguf_meta, pipeline_plan, toolchain
    from appliance.errors import ApplianceError

    try:
        config = pipeline_plan.config_from_gguf(path)
    except gguf_meta.GGUFError:
        return Offload(0, 0, 0.0, f"on the CPU: {path.name}'s header does not give the model's shape to plan with")
    if "CUDA" not in toolchain.runtime_backends():
        return plan(config, 0.0, context, None, False)
    try:
        devices = [d for d in toolchain.runtime_devices() if d.kind in ("gpu", "igpu")]
    except ApplianceError as exc:
        devices, why = [], exc.message
    else:
        why = "the NVIDIA driver may be older than the runtime's CUDA release: appliance doctor says"
    if not devices:
        return Offload(0, int(pipeline_plan.text_config(config)["num_hidden_layers"]), 0.0,
                       f"on the CPU: the llama.cpp runtime has CUDA but sees no GPU ({why})")
    reserve, who = training_reserve(gpu_processes())
    best = max(range(len(devices)), key=lambda i: devices[i].free_mb)
    placed = plan(config, path.stat().st_size / MB, context, float(devices[best].free_mb), True, reserve, who)
    if len(devices) == 1:
        return placed
    return replace(placed, main_gpu=best, reason=f"{placed.reason}; on GPU {best} ({devices[best].description}) "
                                                 f"alone, the one of {len(devices)} with the most free memory")


# -- room for a training job on the same card ------------------------------------------------------


def gpu_processes(timeout_s: float = 10.0) -> dict[int, float]:
    """The processes using a GPU and the memory each holds there (MiB), as the NVIDIA driver reports them."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    try:
        out = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=timeout_s, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return parse_gpu_processes(out)


def parse_gpu_processes(output: str) -> dict[int, float]:
    found: dict[int, float] = {}
    for line in output.splitlines():
        match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+(?:\.\d+)?)\s*(?:MiB)?\s*", line)
        if match:
            found[int(match.group(1))] = found.get(int(match.group(1)), 0.0) + float(match.group(2))
    return found


def training_reserve(processes: dict[int, float]) -> tuple[float, str]:
    """What training jobs on the GPU have planned but not yet taken (MiB), and which runs they are.

    A GPU process is a training job when it holds a run's lock (events.LOCK_FILE) and that run's job record
    says its current job is a training with that process's id (an export or evaluation of the same run holds
    the same lock); its plan is the `planned_peak_mb` metric of that job's events. The plan counts the job's
    peak, which it reaches only at its longest batch, so the memory it holds now is not all it will hold. The
    process asking is never counted (a job placing its own model)."""
    from appliance import events
    from appliance.fsutil import fds_of
    from appliance.run import job_record

    total, runs = 0.0, []
    for pid, used_mb in processes.items():
        if pid == os.getpid():
            continue
        lock = next((p for p in fds_of(pid) if p.endswith("/" + events.LOCK_FILE)), None)
        if lock is None:
            continue
        folder = Path(lock).parent
        record = job_record(folder)
        if record is None or record.stage != "train" or record.pid != pid:
            continue
        planned = planned_peak_mb(folder / events.EVENTS_FILE, record.offset)
        if planned is None or planned <= used_mb:
            continue
        total += planned - used_mb
        runs.append(folder.name)
    return total, ("the training of " + ", ".join(runs)) if runs else ""


def planned_peak_mb(events_path: Path, offset: int = 0) -> float | None:
    """The last memory plan a job wrote into its events from `offset` on (the train stage's `planned_peak_mb`)."""
    from appliance import events

    try:
        found = events.read_all(events_path, offset)
    except OSError:
        return None
    plans = [e.value for e in found if isinstance(e, events.Metric) and e.name == "planned_peak_mb"]
    return float(plans[-1]) if plans else None
