"""Memory and disk of every stage of the pipeline, from a model's config.json alone, against this machine.

`planner` sizes training in detail; this module adds the other stages and puts them side by side, so a user
sees before importing an 8B model whether each stage fits, and each stage refuses before it writes anything
when it does not (`check`), naming what it needs, what is free and the setting that would fit.

What each stage holds at its peak (RAM on a CPU machine; the GPU columns of training come from `planner`):

- import: a Hugging Face folder is read a header at a time and its files copied, or hard-linked when the
  source is on the store's file system (no disk at all); a GGUF source is dequantized by transformers, which
  holds the whole model at the store's 16-bit precision, twice while it saves it.
- train: `planner.plan`; checkpoints and the adapter on disk.
- merge: a few float32 blocks of one tensor and the adapter (`export/merge.py` streams over the shards); the
  merged 16-bit model on disk.
- convert: llama.cpp's converter writes a tensor at a time; the 16-bit GGUF on disk.
- quantize: llama.cpp's quantizer holds one tensor in float32 and its output; each quantized file on disk.
- gate: llama.cpp runs the 16-bit GGUF (its weights, the KV cache of the gate's context and the logits it
  keeps for every position), then the merged model a module at a time in float32 (`streamed`).
- evaluate: llama.cpp runs a quantized file; the `tuned` target on a CPU holds the base at 16 bits and the
  adapter in transformers.
- serve: llama.cpp runs the served file with the KV cache of its context.

Figures for llama.cpp count the model file as resident: it is memory-mapped, and a model whose pages do not
stay in memory is read from disk at every token. The constants were measured on this project's default model
and on random-weight models of real shapes (bench/scale.py prints prediction beside measurement).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance import planner, quants
from appliance.config import TrainConfig

MB = 1024 * 1024
TORCH_RUNTIME_MB = 600.0  # torch + transformers in a job's process (planner.RUNTIME_MB)
LLAMA_RUNTIME_MB = 200.0  # llama.cpp's runtime and its compute buffers for a batch of 512 tokens
CONVERTER_RUNTIME_MB = 350.0  # the converter's interpreter, torch for its lazy tensors, and gguf-py
MERGE_BLOCK_ELEMENTS = 4 << 20  # export/merge.py reads a changed tensor this many elements at a time
MERGE_BLOCKS_IN_FLIGHT = 6  # base block, its float32 copy, the delta, the sum, the rounded result, the check
GATE_CONTEXT = 4096  # the context the gate sizes llama.cpp for at most (export/run.py: _context)
EVAL_CONTEXT = 4096
SERVE_CONTEXT = 4096  # serve/model.py: DEFAULT_CONTEXT
DISK_MARGIN_MB = 64.0
MEMORY_SHARE = 0.95  # what a stage may take of the available memory


@dataclass
class Machine:
    ram_available_mb: float
    ram_total_mb: float
    disk_free_mb: float  # on the store's file system
    gpu_free_mb: float | None = None
    cores: int = 1
    llama_cuda: bool = False  # the llama.cpp runtime was built with CUDA (it offloads to the GPU)

    @classmethod
    def here(cls, store_root: Path) -> Machine:
        from appliance import toolchain
        from appliance.hardware import disk_free_mb, memory, nvidia_gpus

        mem = memory()
        gpus = nvidia_gpus()
        free = [g.memory_free_mb for g in gpus if g.memory_free_mb is not None]
        return cls(ram_available_mb=float(mem.available_mb), ram_total_mb=float(mem.total_mb),
                   disk_free_mb=float(disk_free_mb(store_root)), gpu_free_mb=float(max(free)) if free else None,
                   cores=os.cpu_count() or 1, llama_cuda="CUDA" in toolchain.runtime_backends())


@dataclass
class StageNeed:
    stage: str
    ram_mb: float  # at the stage's peak, in its process
    disk_mb: float  # what it leaves on the store's disk
    detail: str  # what the figures are made of, in words
    vram_mb: float = 0.0
    fix: str = ""  # the setting that makes it smaller, when there is one

    def fits(self, machine: Machine) -> bool:
        gpu_fits = self.vram_mb == 0 or self.vram_mb <= (machine.gpu_free_mb or 0.0) * MEMORY_SHARE
        return self.ram_mb <= machine.ram_available_mb * MEMORY_SHARE and gpu_fits


@dataclass
class PipelinePlan:
    model: str
    parameters: int
    stages: list[StageNeed]
    machine: Machine
    notes: list[str] = field(default_factory=list)

    @property
    def disk_mb(self) -> float:
        return sum(s.disk_mb for s in self.stages)

    def refusals(self) -> list[str]:
        """Why the pipeline does not fit, one sentence per stage and one for the disk; empty when it fits."""
        out = []
        for s in self.stages:
            if s.fits(self.machine):
                continue
            where = (f"{gib(s.vram_mb)} of GPU memory and {gib(self.machine.gpu_free_mb or 0.0)} is free" if s.vram_mb
                     else f"{gib(s.ram_mb)} of memory and {gib(self.machine.ram_available_mb)} is available")
            out.append(f"{s.stage} needs about {where}" + (f" ({s.fix})" if s.fix else ""))
        if self.disk_mb + DISK_MARGIN_MB > self.machine.disk_free_mb:
            out.append(f"the whole pipeline writes about {gb(self.disk_mb)} and the store's disk has "
                       f"{gb(self.machine.disk_free_mb)} free")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "parameters": self.parameters, "machine": asdict(self.machine),
                "stages": [asdict(s) | {"fits": s.fits(self.machine)} for s in self.stages],
                "disk_mb": round(self.disk_mb, 1), "fits": not self.refusals(), "notes": self.notes}


def gib(mb: float) -> str:
    return f"{mb / 1024:.1f} GiB"


def gb(mb: float) -> str:
    return f"{mb * MB / 1e9:.1f} GB"


# -- the model, from its config ---------------------------------------------------------------


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's own settings (multimodal releases nest them under text_config)."""
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, dict) else config


def config_tensors(config: dict[str, Any]) -> list[quants.TensorShape]:
    """The weights a decoder of this config holds, named as in its safetensors (for size predictions of a model
    whose files are not here)."""
    config = text_config(config)
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    tensors = [quants.TensorShape("model.embed_tokens.weight", (vocab, h)),
               quants.TensorShape("model.norm.weight", (h,))]
    if not config.get("tie_word_embeddings", False):
        tensors.append(quants.TensorShape("lm_head.weight", (vocab, h)))
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        for name, (inputs, outputs) in planner._projections(config).items():
            group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            tensors.append(quants.TensorShape(f"{prefix}{group}.{name}.weight", (outputs, inputs)))
        tensors += [quants.TensorShape(prefix + "input_layernorm.weight", (h,)),
                    quants.TensorShape(prefix + "post_attention_layernorm.weight", (h,))]
    return tensors


def kv_bytes_per_token(config: dict[str, Any]) -> int:
    """llama.cpp's KV cache (f16 keys and values of every layer) per token of context."""
    config = text_config(config)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return int(2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim * 2)


def largest_tensor(config: dict[str, Any]) -> int:
    """Elements of the model's largest weight (the embeddings or the head, in every family we know)."""
    return int(max(math.prod(t.shape) for t in config_tensors(config)))


def gguf_mb(config: dict[str, Any], quant: str) -> float:
    vocabulary = text_config(config)["vocab_size"] * 40  # tokens, merges and types as the converter writes them
    return quants.predict_tensors(config_tensors(config), quant, vocabulary).bytes / MB


# -- the stages --------------------------------------------------------------------------------


@dataclass
class Choices:
    """What the user chose that changes the figures (the defaults are the stages' own)."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(store="."))
    quants: list[str] = field(default_factory=lambda: ["Q4_K_M"])
    reference: str = "F16"
    serve_quant: str | None = None  # the recommended one of `quants` when not given
    context: int = SERVE_CONTEXT
    import_kind: str = "dir"  # dir (a Hugging Face folder), gguf, or imported (already in the store)
    link: bool = False  # the folder is on the store's file system and will be hard-linked


def stages(config: dict[str, Any], choices: Choices, machine: Machine) -> list[StageNeed]:
    config = text_config(config)
    params = planner.model_params(config)
    weights16 = params * 2 / MB
    largest32 = largest_tensor(config) * 4 / MB
    kv = kv_bytes_per_token(config) / MB
    vocab = config["vocab_size"]
    out: list[StageNeed] = [_import(choices, weights16)]
    out.append(_train(config, params, choices, machine))
    adapter32 = _adapter_mb(config, choices.train, 4)  # the merge reads the adapter in float32
    merge_ram = TORCH_RUNTIME_MB + MERGE_BLOCKS_IN_FLIGHT * MERGE_BLOCK_ELEMENTS * 4 / MB + adapter32 + 64
    out.append(StageNeed("merge", merge_ram, 0.0 if choices.train.method == "full" else weights16,
                         "a tensor at a time over the shards: a few float32 blocks and the adapter; the merged "
                         "16-bit model on disk"))
    reference = gguf_mb(config, choices.reference)
    out.append(StageNeed("convert", TORCH_RUNTIME_MB + CONVERTER_RUNTIME_MB + 2 * largest32, reference,
                         f"llama.cpp's converter, a tensor at a time, beside the job that waits for it; the "
                         f"{choices.reference} GGUF on disk"))
    quantized = {q: gguf_mb(config, q) for q in choices.quants if q not in ("F16", "BF16")}
    out.append(StageNeed("quantize", TORCH_RUNTIME_MB + 3 * largest32 + 64, sum(quantized.values()),
                         "one tensor in float32 and its quantized copy; "
                         + (", ".join(f"{q} {gb(mb)}" for q, mb in quantized.items()) or "no quantization")))
    context = min(GATE_CONTEXT, int(config.get("max_position_embeddings") or GATE_CONTEXT))
    logits = (context + 512) * vocab * 4 / MB  # every position's logits: llama-cpp-python's copy and llama.cpp's batch
    gate_llama = TORCH_RUNTIME_MB + LLAMA_RUNTIME_MB + reference + kv * context + logits
    gate_streamed = TORCH_RUNTIME_MB + 2 * largest32 + 256
    out.append(_on_gpu(StageNeed("gate", max(gate_llama, gate_streamed), 0.0,
                                 f"the {choices.reference} GGUF through llama.cpp with {context} tokens of context, "
                                 "then the merged model a module at a time in float32"), config, reference, context,
                       machine))
    serve_quant = choices.serve_quant or (quants.RECOMMENDED if quants.RECOMMENDED in quantized
                                          else next(iter(quantized), choices.reference))
    served = quantized.get(serve_quant, reference)
    eval_context = min(EVAL_CONTEXT, context)
    tuned = TORCH_RUNTIME_MB + weights16 + _adapter_mb(config, choices.train, 2) + 256
    gguf_eval = TORCH_RUNTIME_MB + LLAMA_RUNTIME_MB + served + kv * eval_context
    out.append(_on_gpu(StageNeed("evaluate", max(tuned, gguf_eval), 0.0,
                                 f"the tuned model at 16 bits in transformers, or {serve_quant} through llama.cpp",
                                 fix="evaluate only gguf targets (--targets gguf) to leave out the 16-bit model"),
                       config, served, eval_context, machine))
    out.append(_on_gpu(StageNeed("serve", LLAMA_RUNTIME_MB + served + kv * choices.context, 0.0,
                                 f"{serve_quant} ({gb(served)}) through llama.cpp with {choices.context} tokens of "
                                 "context", fix="serve with a smaller --ctx, or a smaller quantization"),
                       config, served, choices.context, machine))
    return out


def _on_gpu(need: StageNeed, config: dict[str, Any], file_mb: float, context: int, machine: Machine) -> StageNeed:
    """A llama.cpp stage with the share of the model that `offload` puts on this machine's GPU: its VRAM, and the
    layers it says where."""
    if not machine.llama_cuda or machine.gpu_free_mb is None:
        return need
    from appliance import offload

    placed = offload.plan(config, file_mb, context, machine.gpu_free_mb, True)
    if placed.on_gpu:
        need.vram_mb = placed.vram_mb
        need.detail += f"; {placed.reason}"
    return need


def _import(choices: Choices, weights16: float) -> StageNeed:
    if choices.import_kind == "imported":
        return StageNeed("import", 0.0, 0.0, "already in the store")
    if choices.import_kind == "gguf":
        return StageNeed("import", TORCH_RUNTIME_MB + 2 * weights16, weights16,
                         "transformers dequantizes the GGUF: the whole model at 16 bits, twice while saving",
                         fix="import the model's Hugging Face folder (safetensors) instead: it streams")
    if choices.link:
        return StageNeed("import", TORCH_RUNTIME_MB, 0.0, "the weights are hard-linked from the source folder")
    return StageNeed("import", TORCH_RUNTIME_MB, weights16, "the weights are copied into the store",
                     fix="put the folder on the store's file system: the import then links instead of copying")


def _adapter_mb(config: dict[str, Any], cfg: TrainConfig, bytes_per: int) -> float:
    if cfg.method == "full":
        return 0.0
    return planner._lora_params(config, cfg.rank, cfg.target_modules) * bytes_per / MB


def _train(config: dict[str, Any], params: int, choices: Choices, machine: Machine) -> StageNeed:
    cfg = choices.train
    device = "cuda" if machine.gpu_free_mb is not None else "cpu"
    available = machine.gpu_free_mb if machine.gpu_free_mb is not None else machine.ram_available_mb
    if device == "cpu" and cfg.method == "qlora":
        cfg = cfg.model_copy(update={"method": "lora"})
    if cfg.dtype == "auto":
        cfg = cfg.model_copy(update={"dtype": "bfloat16" if device == "cuda" else "float32"})
    plan = planner.plan_from_config(cfg, config, params, cfg.max_seq_len, device, available)
    disk = plan.disk_mb
    detail = (f"{cfg.method}, batch {cfg.batch_size} x {cfg.max_seq_len} tokens"
              + (", gradient checkpointing" if cfg.gradient_checkpointing else "") + f", on {device}")
    fix = ""
    if not plan.fits:
        found = planner.nearest_fit_from_config(cfg, config, params, cfg.max_seq_len, device, available)
        fix = f"with {planner.as_flags(found[0])} it needs {gib(found[1].peak_mb)}" if found else "no setting fits"
    if device == "cuda":
        return StageNeed("train", TORCH_RUNTIME_MB, disk, detail, vram_mb=plan.peak_mb, fix=fix)
    return StageNeed("train", plan.peak_mb, disk, detail, fix=fix)


def pipeline(config: dict[str, Any], model: str, choices: Choices, machine: Machine) -> PipelinePlan:
    config = text_config(config)
    plan = PipelinePlan(model, planner.model_params(config), stages(config, choices, machine), machine)
    if machine.gpu_free_mb is None and choices.train.method == "qlora":
        plan.notes.append("qlora needs a CUDA GPU: on this machine training is planned as lora")
    return plan


def fit_summary(config: dict[str, Any], machine: Machine) -> dict[str, str]:
    """Whether LoRA and QLoRA training and serving (Q4_K_M, 4096 tokens of context) fit this machine, in words,
    with the smallest training setting that fits when the defaults do not."""
    config = text_config(config)
    params = planner.model_params(config)
    gpu = machine.gpu_free_mb is not None
    device, available = ("cuda", machine.gpu_free_mb or 0.0) if gpu else ("cpu", machine.ram_available_mb)
    out: dict[str, str] = {}
    for method in ("lora", "qlora"):
        if method == "qlora" and not gpu:
            out[method] = "needs a GPU"
            continue
        cfg = TrainConfig(store=".", method=method, dtype="bfloat16" if gpu else "float32")
        plan = planner.plan_from_config(cfg, config, params, cfg.max_seq_len, device, available)
        if plan.fits:
            out[method] = f"yes ({gib(plan.peak_mb)})"
            continue
        found = planner.nearest_fit_from_config(cfg, config, params, cfg.max_seq_len, device, available)
        out[method] = f"with {planner.as_flags(found[0])}" if found else f"no ({gib(plan.peak_mb)})"
    serve = stages(config, Choices(import_kind="imported"), machine)[-1]
    out["serve"] = f"{'yes' if serve.fits(machine) else 'no'} ({gib(serve.ram_mb)})"
    return out


def config_from_gguf(path: Path) -> dict[str, Any]:
    """The settings of config.json that the plan needs, read from a GGUF's header (a catalog model ships as one)."""
    from appliance import gguf_meta

    info = gguf_meta.read(path)
    arch = info.architecture or "llama"
    fields = info.fields

    def get(key: str) -> int:
        if f"{arch}.{key}" not in fields:
            raise gguf_meta.GGUFError(f"{path} has no {arch}.{key} in its header, so its memory cannot be planned",
                                      "Its model can still be used; the appliance cannot size it beforehand.")
        return int(fields[f"{arch}.{key}"])

    heads = get("attention.head_count")
    config = {"hidden_size": get("embedding_length"), "num_hidden_layers": get("block_count"),
              "intermediate_size": get("feed_forward_length"), "num_attention_heads": heads,
              "num_key_value_heads": int(fields.get(f"{arch}.attention.head_count_kv", heads)),
              "vocab_size": len(info.tokens), "max_position_embeddings": get("context_length"),
              "tie_word_embeddings": "output.weight" not in info.tensor_names}
    if f"{arch}.attention.key_length" in fields:
        config["head_dim"] = get("attention.key_length")
    return config


def read_config(path: Path) -> dict[str, Any]:
    """A model's config.json, with an error that names the file when it is not one."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        planner.model_params(text_config(config))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise planner.PlanRefused(f"{path}: not a readable model config.json ({type(exc).__name__}: {exc})",
                          "Give the config.json of a Hugging Face causal language model.") from exc
    if not isinstance(config, dict):
        raise planner.PlanRefused(f"{path}: not a model config.json (a JSON object)", "Give a model's config.json.")
    return config


# -- the gate's budget -----------------------------------------------------------------------

# llama.cpp's prompt processing of a 16-bit GGUF with every position's logits, per CPU core: 31 measured on the
# default model with 2 threads over a 1024-token prompt (231 tokens/s)
PREFILL_GFLOPS_PER_CORE = 30.0
GATE_PPL_SECONDS = 150.0  # what the perplexity of one file may take
GATE_MIN_PPL_TOKENS = 512


@dataclass
class GateBudget:
    ppl_tokens: int  # validation tokens scored per file
    asked: int  # the export's --ppl-tokens
    tokens_per_s: float  # llama.cpp's expected prompt processing of the 16-bit GGUF here

    def sentence(self) -> str:
        if self.ppl_tokens >= self.asked:
            return f"perplexity over up to {self.ppl_tokens:,} validation tokens per file"
        return (f"perplexity over up to {self.ppl_tokens:,} validation tokens per file (of {self.asked:,} asked): "
                f"this machine runs the 16-bit model at about {self.tokens_per_s:,.0f} tokens/s, so more would take "
                f"over {GATE_PPL_SECONDS / 60:.1f} minutes per file")


def gate_budget(parameters: int, asked: int, cores: int | None = None) -> GateBudget:
    """How many validation tokens the gate scores per file: what was asked, unless this machine would take more
    than GATE_PPL_SECONDS for them with a model of this size (never fewer than GATE_MIN_PPL_TOKENS)."""
    cores = cores or os.cpu_count() or 1
    rate = PREFILL_GFLOPS_PER_CORE * 1e9 * cores / (2 * max(parameters, 1))
    affordable = max(GATE_MIN_PPL_TOKENS, int(rate * GATE_PPL_SECONDS) // 256 * 256)
    return GateBudget(min(asked, affordable), asked, rate)


# -- the checks each stage makes before it writes ----------------------------------------------


def check_memory(need_mb: float, available_mb: float, doing: str, fix: str) -> None:
    """Refuse `doing` when it needs more memory than is available, naming both and the setting that fits."""
    if need_mb > available_mb * MEMORY_SHARE:
        raise planner.PlanRefused(f"{doing} needs about {gib(need_mb)} of memory and {gib(available_mb)} is available",
                          fix or "Close other programs, or use a machine with more memory.")


def check_disk(need_mb: float, folder: Path, doing: str, fix: str) -> None:
    """Refuse `doing` before it writes when the store's disk has less free space than it needs."""
    from appliance.hardware import disk_free_mb

    free = float(disk_free_mb(folder))
    if need_mb + DISK_MARGIN_MB > free:
        hint = "Free space on that disk (df -h shows it)" + (f", or {fix}" if fix else "") + "; nothing was written."
        raise planner.PlanRefused(f"{doing} needs {gb(need_mb + DISK_MARGIN_MB)} of disk and {folder} has "
                                  f"{gb(free)} free", hint)


def available_memory_mb() -> float:
    from appliance.hardware import memory

    return float(memory().available_mb)
