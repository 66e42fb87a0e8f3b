"""Memory and disk plan of a training run, before anything loads (the training stage checks it, the TUI
shows it as settings are typed, `appliance train plan` sizes a cluster with it, and exports size the
serving engines with it).

Peak memory = runtime + weights at their precision + trainable state (LoRA or full weights, their
gradients and AdamW's two fp32 moments) + activations of one micro-batch at its longest padded
length. Activations have two parts: the transformer layers (hidden states, MLP intermediates and
attention scores per token and layer; with gradient checkpointing only each layer's input plus
one layer's worth) and the logits over the vocabulary, which the loss keeps in fp32 several times
over, but only for answer tokens (the loss projects nothing else onto the vocabulary). The
constants were fitted to peak RSS of this project's default model on the CPU at several batch
sizes, with and without checkpointing (tests/test_planner.py checks two settings against fresh
measurements). A plan that does not fit is refused with the nearest setting that does.

On a CUDA GPU the plan counts VRAM: torch's CUDA context, then everything else times the caching
allocator's overhead (what it reserves beyond what tensors take at the peak). QLoRA's linear weights
are NF4 with double quantisation (4 bits, an 8-bit scale per 64 weights and a float32 scale per 256
of those); what is not quantized (embeddings, head, norms) stays 16-bit with Unsloth and becomes
float32 with the hf backend (peft's prepare_model_for_kbit_training upcasts it). Gradient checkpointing
keeps each layer's input on the GPU with hf and moves it to CPU RAM with Unsloth's own checkpointing,
so there only the layer being recomputed is on the GPU. The CUDA constants are not fitted on a GPU yet:
they come from torch's and bitsandbytes' documented layouts and published measurements of 7-8B QLoRA,
and bench/gpu/check.sh measures them against the prediction where a GPU is lent.

With several processes the plan is per device. DDP keeps a whole replica on each (plus a bucket
of the trainable gradients for the all-reduce), so it adds throughput, never room. FSDP shards
weights, gradients and optimizer state over the processes and gathers one decoder layer at a
time (two in flight: the next is prefetched), plus the embeddings and head of the root unit;
`devices_needed` is the smallest number of devices on which such a shard fits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config import TrainConfig
from appliance.errors import ApplianceError

MB = 1024 * 1024
RUNTIME_MB = {"cpu": 600.0, "cuda": 0.0}  # torch + transformers + peft in the process; CUDA counts VRAM only
UNSLOTH_RAM_MB = 220.0  # what importing Unsloth and unsloth_zoo adds to a CPU job (measured: 170-202 MB over hf)
CUDA_CONTEXT_MB = 500.0  # torch's CUDA context (lazily loaded kernels, cuBLAS workspace) on CUDA 12-13
ALLOCATOR_OVERHEAD = 1.08  # torch's caching allocator: reserved over allocated at the peak
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # per quantized weight: 4 bits, an 8-bit absmax per 64, fp32 per 256 blocks
LOGIT_COPIES = 5.5  # fp32 vocabulary-sized tensors per token kept by the loss and its backward
LAYER_FACTOR = 3.65  # h-sized tensors per token and layer, in units of (6h + 2I): fitted on CPU RSS
CHECKPOINTED_SHARE = 0.45  # what gradient checkpointing (non-reentrant, with peft) still kept, measured
ADAM_BYTES = 16  # fp32 parameter, gradient and two moments per trainable parameter
DDP_BUCKET_BYTES = 4  # the all-reduce's fp32 copy of each trainable gradient
FSDP_UNITS_IN_FLIGHT = 2  # the layer being computed and the one being prefetched


@dataclass
class Plan:
    device: str
    tokens_per_micro_batch: int
    seq_len: int
    weights_mb: float
    trainable_params: int
    trainable_state_mb: float
    activations_mb: float
    runtime_mb: float
    peak_mb: float
    available_mb: float
    disk_mb: float
    processes: int = 1  # every process of the run, on every node
    sharding: str = "ddp"
    gathered_mb: float = 0.0  # FSDP: what one device holds unsharded while computing

    @property
    def fits(self) -> bool:
        return self.peak_mb <= self.available_mb * 0.95

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in self.__dict__.items()} | {
            "fits": self.fits}


def _projections(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(inputs, outputs) of each linear projection of one decoder layer."""
    h = config["hidden_size"]
    inter = config.get("intermediate_size", 4 * h)
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or h // heads
    return {"q_proj": (h, heads * head_dim), "k_proj": (h, kv * head_dim), "v_proj": (h, kv * head_dim),
            "o_proj": (heads * head_dim, h), "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def _lora_params(config: dict[str, Any], rank: int, targets: list[str] | str) -> int:
    shapes = _projections(config)
    chosen = shapes if targets == "all-linear" else {k: v for k, v in shapes.items() if k in targets}
    return int(config["num_hidden_layers"] * sum(rank * (i + o) for i, o in chosen.values()))


def layer_params(config: dict[str, Any]) -> int:
    """Weights of one decoder layer (its projections; norms are negligible)."""
    return sum(i * o for i, o in _projections(config).values())


def model_params(config: dict[str, Any]) -> int:
    """Weights of the whole model from its config alone: layers with their two norms, embeddings, the final
    norm, and the head unless tied to the embeddings."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    embed = config["vocab_size"] * h
    head = 0 if config.get("tie_word_embeddings", False) else embed
    return int(layers * (layer_params(config) + 2 * h) + embed + h + head)


def plan(cfg: TrainConfig, model_dir: Path, parameters: int, data_max_tokens: int, device: str,
         available_mb: float, trained_fraction: float = 1.0, backend: str | None = None) -> Plan:
    """Peak memory of one device (one process) of the run. `trained_fraction`: the largest share of a
    row's tokens that are answer tokens; the loss projects only those onto the vocabulary."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return plan_from_config(cfg, config, parameters, data_max_tokens, device, available_mb, trained_fraction, backend)


def training_backend(cfg: TrainConfig, device: str) -> str:
    """The backend a run of `cfg` trains with on `device`, as `train.model.choose_backend` picks it when Unsloth
    is installed (install.sh --gpu installs it): Unsloth on CUDA, hf on the CPU and with several processes."""
    if cfg.backend != "auto":
        return cfg.backend
    return "unsloth" if device == "cuda" and cfg.world_size == 1 else "hf"


def plan_from_config(cfg: TrainConfig, config: dict[str, Any], parameters: int, data_max_tokens: int, device: str,
                     available_mb: float, trained_fraction: float = 1.0, backend: str | None = None) -> Plan:
    """`plan` for a model known by its config.json alone (no weights needed: for sizing a cluster)."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    inter = config.get("intermediate_size", 4 * h)
    heads, vocab = config["num_attention_heads"], config["vocab_size"]
    backend = backend or training_backend(cfg, device)
    dtype_bytes = 4 if cfg.dtype == "float32" else 2
    seq = max(1, min(cfg.max_seq_len, data_max_tokens))
    tokens = cfg.batch_size * seq
    weights: float = parameters * dtype_bytes
    if cfg.method == "qlora":
        linear = layers * layer_params(config)
        kept_bytes = 2 if backend == "unsloth" else 4  # peft upcasts what bitsandbytes did not quantize
        weights = linear * NF4_BYTES + (parameters - linear) * kept_bytes
    trainable = parameters if cfg.method == "full" else _lora_params(config, cfg.rank, cfg.target_modules)
    state: float = trainable * ADAM_BYTES
    # SDPA keeps no seq x seq score matrix, so attention adds little per token beyond its projections
    per_layer_token = dtype_bytes * ((6 * h + 2 * inter) * LAYER_FACTOR + 0.2 * heads * seq)
    layer_act = tokens * layers * per_layer_token
    if cfg.gradient_checkpointing and device == "cuda":
        # the layer being recomputed, plus each layer's input: kept on the GPU by torch's checkpointing, moved
        # to CPU RAM by Unsloth's (two in flight while they are copied)
        inputs = tokens * h * dtype_bytes * (2 if backend == "unsloth" else layers)
        layer_act = tokens * per_layer_token + inputs
    elif cfg.gradient_checkpointing:
        layer_act *= CHECKPOINTED_SHARE
    logits = tokens * min(1.0, trained_fraction) * vocab * 4 * LOGIT_COPIES
    runtime = CUDA_CONTEXT_MB if device == "cuda" else RUNTIME_MB.get(device, 0.0)
    if device == "cpu" and backend == "unsloth":
        runtime += UNSLOTH_RAM_MB
    world = cfg.world_size
    gathered = 0.0
    if cfg.sharding == "fsdp" and world > 1:
        unit_bytes = weights / parameters if parameters else dtype_bytes  # bytes per weight at the stored precision
        embed = vocab * h * (1 if config.get("tie_word_embeddings", False) else 2) * dtype_bytes
        gathered = FSDP_UNITS_IN_FLIGHT * layer_params(config) * unit_bytes + embed
        weights, state = weights / world, state / world
    elif world > 1:
        state += trainable * DDP_BUCKET_BYTES
    overhead = ALLOCATOR_OVERHEAD if device == "cuda" else 1.0
    peak = runtime + overhead * (weights + state + gathered + layer_act + logits) / MB
    adapter = trainable * dtype_bytes
    disk = (cfg.keep_checkpoints * (adapter + trainable * 8) + adapter) / MB  # checkpoints (weights, two moments)
    # and the final adapter; what the export writes is in pipeline_plan
    return Plan(device=device, tokens_per_micro_batch=tokens, seq_len=seq, weights_mb=weights / MB,
                trainable_params=trainable, trainable_state_mb=state / MB,
                activations_mb=(layer_act + logits) / MB, runtime_mb=runtime, peak_mb=peak,
                available_mb=available_mb, disk_mb=disk, processes=world, sharding=cfg.sharding,
                gathered_mb=gathered / MB)


def devices_needed(cfg: TrainConfig, config: dict[str, Any], parameters: int, data_max_tokens: int,
                   device_mb: float, trained_fraction: float = 1.0, limit: int = 1024) -> tuple[int, Plan] | None:
    """The smallest number of devices of `device_mb` each on which the run fits at `cfg.sharding`, with
    its per-device plan; None when no number does (DDP: when one device is too small, since every
    device holds a whole replica; FSDP: when even the gathered layers and activations do not fit)."""
    if cfg.sharding == "ddp":
        single = plan_from_config(cfg.model_copy(update={"processes": 1, "nodes": 1}), config, parameters,
                                  data_max_tokens, "cuda", device_mb, trained_fraction)
        return (1, single) if single.fits else None
    for devices in range(1, limit + 1):
        trial = cfg.model_copy(update={"processes": devices, "nodes": 1})
        result = plan_from_config(trial, config, parameters, data_max_tokens, "cuda", device_mb, trained_fraction)
        if result.fits:
            return devices, result
        if result.peak_mb - ALLOCATOR_OVERHEAD * (result.weights_mb + result.trainable_state_mb) > device_mb * 0.95:
            return None  # what does not shrink with more devices is already too big
    return None


def nearest_fit(cfg: TrainConfig, model_dir: Path, parameters: int, data_max_tokens: int, device: str,
                available_mb: float, trained_fraction: float = 1.0,
                backend: str | None = None) -> tuple[dict[str, Any], Plan] | None:
    """The smallest change that fits: checkpointing, then smaller batches (same effective batch
    through accumulation), then shorter sequences, then 4-bit on a GPU."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return nearest_fit_from_config(cfg, config, parameters, data_max_tokens, device, available_mb, trained_fraction,
                                   backend)


def nearest_fit_from_config(cfg: TrainConfig, config: dict[str, Any], parameters: int, data_max_tokens: int,
                            device: str, available_mb: float, trained_fraction: float = 1.0,
                            backend: str | None = None) -> tuple[dict[str, Any], Plan] | None:
    """`nearest_fit` for a model known by its config.json alone."""
    candidates: list[dict[str, Any]] = []
    if not cfg.gradient_checkpointing:
        candidates.append({"gradient_checkpointing": True})
    batch = cfg.batch_size
    accum = cfg.grad_accum
    while batch > 1:
        batch, accum = batch // 2, accum * 2
        candidates.append({"gradient_checkpointing": True, "batch_size": batch, "grad_accum": accum})
    seq = min(cfg.max_seq_len, data_max_tokens)
    while seq > 256:
        seq //= 2
        candidates.append({"gradient_checkpointing": True, "batch_size": 1,
                           "grad_accum": cfg.grad_accum * cfg.batch_size, "max_seq_len": seq})
    if device == "cuda" and cfg.method == "lora":
        candidates.append({"method": "qlora", "gradient_checkpointing": True, "batch_size": 1,
                           "grad_accum": cfg.grad_accum * cfg.batch_size})
    for change in candidates:
        trial = cfg.model_copy(update=change)
        result = plan_from_config(trial, config, parameters, data_max_tokens, device, available_mb, trained_fraction,
                                  backend)
        if result.fits:
            return {k: v for k, v in change.items() if getattr(cfg, k) != v}, result  # what changes, named
    return None


class PlanRefused(ApplianceError):
    title = "Does not fit this machine"


def device_memory(processes: int, gpu_free_mb: float | None) -> tuple[str, float]:
    """Where a run trains and the memory one of its processes may take: the GPU's free memory when there is a
    GPU, else the machine's available RAM, shared by the processes of this machine."""
    if gpu_free_mb is not None:
        return "cuda", gpu_free_mb
    from appliance.hardware import memory

    return "cpu", float(memory().available_mb) / processes


def check(cfg: TrainConfig, model_dir: Path, parameters: int, data_max_tokens: int, device: str,
          available_mb: float, trained_fraction: float = 1.0, backend: str | None = None) -> Plan:
    """The plan of a run that fits; PlanRefused, with the nearest setting that fits, for one that does not."""
    if cfg.method == "qlora" and device != "cuda":
        raise PlanRefused("qlora loads the base in 4-bit with bitsandbytes, which needs a CUDA GPU, and this "
                          "machine trains on its CPU",
                          "Use method lora here (the same adapter, on 16/32-bit weights), or train on a machine "
                          "with an NVIDIA GPU.")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    predicted = plan_from_config(cfg, config, parameters, data_max_tokens, device, available_mb, trained_fraction,
                                 backend)
    if not predicted.fits:
        fix = nearest_fit_from_config(cfg, config, parameters, data_max_tokens, device, available_mb, trained_fraction,
                                      backend)
        hint = (f"With {as_flags(fix[0])} it needs about {fix[1].peak_mb / 1024:.1f} GiB." if fix
                else no_fit_hint(cfg, config, parameters, data_max_tokens, device, trained_fraction, backend))
        raise PlanRefused(f"this run needs about {predicted.peak_mb / 1024:.1f} GiB of {device} memory but "
                          f"{predicted.available_mb / 1024:.1f} GiB is available", hint)
    return predicted


SMALLEST = {"gradient_checkpointing": True, "batch_size": 1, "max_seq_len": 256}


def no_fit_hint(cfg: TrainConfig, config: dict[str, Any], parameters: int, data_max_tokens: int, device: str,
                trained_fraction: float = 1.0, backend: str | None = None) -> str:
    """What to do when no setting of this model fits: the least it needs, and on a GPU the recipe for the card."""
    smallest = {**SMALLEST, **({"method": "qlora"} if device == "cuda" and cfg.method == "lora" else {})}
    least = plan_from_config(cfg.model_copy(update=smallest), config, parameters, data_max_tokens, device, 0.0,
                             trained_fraction, backend)
    text = f"No setting fits: even with {as_flags(smallest)} it needs about {least.peak_mb / 1024:.1f} GiB. "
    if device == "cuda":
        return text + ("Train a 1-3B model on this card (appliance/train/recipes/3b-qlora-8gb.yaml fits 8-12 GB), "
                       "or this one on a card with more memory (7-8B: 8b-qlora-24gb.yaml on 24 GB).")
    return text + "Use a smaller base model or a machine with more memory."


def summary(plan: Plan) -> str:
    """The plan in one sentence: the peak, where, and what is available."""
    each = f" per process ({plan.processes}, {plan.sharding.upper()})" if plan.processes > 1 else ""
    return (f"about {plan.peak_mb / 1024:.1f} GiB at peak on {plan.device}{each}, "
            f"{plan.available_mb / 1024:.1f} GiB available")


def as_flags(change: dict[str, Any]) -> str:
    parts = []
    for key, value in change.items():
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


SERVING_SEQUENCES = 8  # sequences of full context a serving engine should hold at once to be worth its GPUs
SERVING_UTILIZATION = 0.9  # the share of each GPU vLLM takes by default (--gpu-memory-utilization)
SERVING_OVERHEAD_MB = 1536.0  # CUDA context, kernels' workspace, activations of one forward pass


@dataclass
class ServingPlan:
    tensor_parallel: int | None  # GPUs one replica is split over; None when no degree up to 8 fits
    context: int
    sequences: int
    weights_mb: float  # 16-bit weights, whole model
    kv_mb_per_token: float
    per_gpu_mb: float  # at the suggested degree (or at 8 when none fits)
    gpu_mb: float


def serving_plan(config: dict[str, Any], gpu_mb: float, context: int,
                 sequences: int = SERVING_SEQUENCES) -> ServingPlan:
    """The smallest tensor-parallel degree (a power of two dividing the attention heads) at which the merged
    16-bit model plus the KV cache of `sequences` full contexts fits in each GPU, as vLLM or TGI would shard it."""
    weights = model_params(config) * 2
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_per_token = 2 * layers * kv_heads * head_dim * 2  # K and V, fp16, every layer
    need = weights + kv_per_token * context * sequences
    per_gpu = 0.0
    for degree in (1, 2, 4, 8):
        if heads % degree:
            continue
        per_gpu = need / degree / MB + SERVING_OVERHEAD_MB
        if per_gpu <= gpu_mb * SERVING_UTILIZATION:
            return ServingPlan(degree, context, sequences, weights / MB, kv_per_token / MB, per_gpu, gpu_mb)
    return ServingPlan(None, context, sequences, weights / MB, kv_per_token / MB, per_gpu, gpu_mb)
