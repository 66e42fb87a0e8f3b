"""The model a training loads: the backend (Unsloth or transformers + peft), the compute precision, the
base in 16/32 or 4 bits with its LoRA adapters, and saved weights loaded back (a resume, --init-from)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.config import TrainConfig
from appliance.errors import ConfigError
from appliance.events import Emitter
from appliance.train import distributed


def _dtype(cfg: TrainConfig) -> Any:
    import torch

    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On CPUs with native bf16 (AVX512-BF16 / AMX) bf16 is faster and halves memory.
    return torch.bfloat16 if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else torch.float32


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_backend(cfg: TrainConfig, emit: Emitter) -> str:
    """`auto` takes Unsloth on a CUDA GPU when it imports, else hf. On the CPU our hf path measured
    faster than Unsloth's CPU fallback in this same loop (bench/train_throughput.py: 248 vs 228
    real tokens/s), so `auto` uses hf there; `--backend unsloth` still chooses it."""
    if cfg.backend == "hf":
        return "hf"
    if distributed.wanted(cfg):  # the config refuses unsloth with several processes
        if not distributed.in_rank():
            emit.log(f"{cfg.world_size} process(es), {cfg.sharding.upper()}: the hf backend (transformers + peft "
                     "through accelerate), since Unsloth trains on one device")
        return "hf"
    if cfg.backend == "auto":
        import torch

        if not torch.cuda.is_available():
            return "hf"
    try:
        import unsloth  # noqa: F401
    except Exception as exc:
        if cfg.backend == "unsloth":
            raise ConfigError(f"Unsloth does not load here: {type(exc).__name__}: {exc}",
                              "Use --backend hf, or run ./install.sh again.") from exc
        emit.log(f"Unsloth does not load here ({type(exc).__name__}); using the hf backend", "warning")
        return "hf"
    return "unsloth"


def _linear_names(model: Any) -> list[str]:
    import torch

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and "lm_head" not in name}
    return sorted(names)


def _load_unsloth(cfg: TrainConfig, model_dir: Path, dtype: Any) -> Any:
    from unsloth import FastLanguageModel

    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(model_dir), max_seq_length=cfg.max_seq_len, dtype=dtype,
        load_in_4bit=cfg.method == "qlora", full_finetuning=cfg.method == "full", local_files_only=True,
    )
    if cfg.method == "full":
        return model
    targets = _linear_names(model) if cfg.target_modules == "all-linear" else cfg.target_modules
    return FastLanguageModel.get_peft_model(
        model, r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
        use_gradient_checkpointing="unsloth" if cfg.gradient_checkpointing else False, random_state=cfg.seed,
    )


def load_model(cfg: TrainConfig, model_dir: Path, backend: str, device: Any = None) -> tuple[Any, str]:
    """The base model with its adapters, on `device` (a rank's own; the first GPU, or the CPU, by default)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = _dtype(cfg)
    if backend == "unsloth":
        if cfg.method == "qlora" and not torch.cuda.is_available():
            raise ConfigError("qlora loads the base in 4-bit, which needs a CUDA GPU", "Use --method lora here.")
        return _load_unsloth(cfg, model_dir, dtype), str(dtype).removeprefix("torch.")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.method == "qlora":
        if not torch.cuda.is_available():
            raise ConfigError("qlora loads the base in 4-bit with bitsandbytes, which needs a CUDA GPU",
                              "Use --method lora on this machine.")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": (device.index or 0) if device is not None else 0}
        if cfg.sharding == "fsdp":  # FSDP shards the 4-bit weights only when they are stored as the compute dtype
            kwargs["quantization_config"].bnb_4bit_quant_storage = dtype
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if torch.cuda.is_available() and cfg.method != "qlora":
        model = model.to(device if device is not None else "cuda")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.method == "full":
        return model, str(dtype).removeprefix("torch.")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                      target_modules=cfg.target_modules)
    model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return model, str(dtype).removeprefix("torch.")


def load_weights(model: Any, folder: Path, method: str) -> None:
    from safetensors.torch import load_file

    if method == "full":
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
        return
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
