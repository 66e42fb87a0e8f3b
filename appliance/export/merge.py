"""Merge a run's adapter onto its 16-bit base model, into `merged/`.

The base is always loaded fresh from the store in full precision, never in 4 bits: a LoRA
merged into a 4-bit base picks up the rounding of the 4-bit weights, which is how other tools
end up exporting a model that is not the one they trained. The merge happens in float32 and is
rounded once to the base's own dtype. `merged/merge.json` records which adapter it holds, so a
second export of the same adapter sees the merge is done and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from appliance import faults
from appliance.errors import ApplianceError, is_disk_full
from appliance.events import Emitter
from appliance.fsutil import fsync_dir, replace_dir, sha256_file
from appliance.records import MergeResult
from appliance.run import Run

PROBE = [{"role": "user", "content": "Summarise in one line: the printer on floor 3 jams every morning."}]


class ExportError(ApplianceError):
    title = "Export problem"


def adapter_weights(adapter_dir: Path) -> Path:
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise ExportError(f"{adapter_dir} holds no adapter_model.safetensors",
                      "Train the run first (appliance train --run RUN), or train it again if it was interrupted.")


def is_full_model(adapter_dir: Path) -> bool:
    return not (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "config.json").is_file()


def merge(run: Run, base_dir: Path, emit: Emitter, device: str = "auto") -> MergeResult:
    """`merged/` for the run's adapter; reused when it already holds this adapter."""
    adapter_dir = run.adapter_dir
    if not adapter_dir.is_dir():
        raise ExportError(f"run {run.id} has no trained adapter", f"Train it first: appliance train --run {run.id}")
    digest = sha256_file(adapter_weights(adapter_dir))
    final = run.merged_dir
    previous = run.merge_record()
    if previous is not None and previous.adapter_sha256 == digest and _complete(final):
        emit.log(f"merged model already holds adapter {digest[:12]}; reusing {final}")
        return previous.model_copy(update={"reused": True, "seconds": 0.0, "merged": str(final)})
    _refuse_quantized_base(base_dir)
    started = time.monotonic()
    tmp = run.path / f".merged-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        faults.point("export.merge")
        result = _merge_into(tmp, adapter_dir, base_dir, digest, device, emit)
        result = result.model_copy(update={"seconds": round(time.monotonic() - started, 2), "merged": str(final)})
        run.write_merge_record(result, tmp)
        fsync_dir(tmp)
        faults.point("export.merge.register")
        replace_dir(tmp, final)
    except Exception as exc:
        if isinstance(exc, OSError) or is_disk_full(exc):  # safetensors reports I/O errors as its own type
            raise disk_error(exc, "writing the merged model") from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _merge_into(folder: Path, adapter_dir: Path, base_dir: Path, digest: str, device: str,
                emit: Emitter) -> MergeResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    save_dtype = getattr(torch, str(base_config.get("torch_dtype") or base_config.get("dtype") or "bfloat16"))
    target = _device(device, base_dir)
    emit.progress(f"merging the adapter on {target}", 0, 3)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    if is_full_model(adapter_dir):
        model = AutoModelForCausalLM.from_pretrained(str(adapter_dir), dtype=torch.float32)
        reference = merged_logits = _logits(model, tokenizer)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(target)
        tuned = PeftModel.from_pretrained(base, str(adapter_dir))
        reference = _logits(tuned, tokenizer)
        emit.check_cancelled()
        emit.progress(f"merging the adapter on {target}", 1, 3)
        model = tuned.merge_and_unload()
        model = model.to(save_dtype).to(torch.float32)  # round once, as saved, and measure that
        merged_logits = _logits(model, tokenizer)
    emit.check_cancelled()
    emit.progress("writing the merged model", 2, 3)
    model = model.to(save_dtype)
    model.config.use_cache = True
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    if not (folder / "chat_template.jinja").is_file() and isinstance(tokenizer.chat_template, str):
        (folder / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    diff = float((reference - merged_logits).abs().max())
    agreement = float((reference.argmax(-1) == merged_logits.argmax(-1)).float().mean())
    emit.progress("merged", 3, 3)
    return MergeResult(merged=str(folder), adapter_sha256=digest, base_model=base_dir.name,
                       dtype=str(save_dtype).removeprefix("torch."), device=str(target), reused=False, seconds=0.0,
                       max_logit_diff=round(diff, 4), top1_agreement=round(agreement, 4))


def _logits(model: Any, tokenizer: Any) -> Any:
    import torch

    ids = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=ids["input_ids"].to(device)).logits[0].float().cpu()


def _device(choice: str, base_dir: Path) -> str:
    """CUDA when asked or when it has room for the model in float32 twice over; else the CPU."""
    import torch

    if choice != "auto":
        return choice
    if not torch.cuda.is_available():
        return "cpu"
    weights = sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))
    free, _total = torch.cuda.mem_get_info()
    return "cuda" if free > weights * 2 * 2.5 else "cpu"  # 16-bit files, float32 copies, adapter, headroom


def _refuse_quantized_base(base_dir: Path) -> None:
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    quant = config.get("quantization_config")
    if quant:
        raise ExportError(
            f"the base model {base_dir.name} is stored quantized ({quant.get('quant_method', 'unknown')}); "
            "merging an adapter into quantized weights changes what the model says",
            "Import the 16-bit release of this model (safetensors in bf16/fp16) and export again.",
        )


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def disk_error(exc: BaseException, doing: str) -> ExportError:
    """A write that failed for lack of space (or a file-size limit) explained as such."""
    if is_disk_full(exc):
        return ExportError(f"the disk is full (or a file-size limit was hit) while {doing}",
                           "Free space in the store's disk (df -h shows it) and export again; nothing half-written "
                           "was kept.")
    return ExportError(f"could not write while {doing}: {exc}", "Check the store's permissions and free space.")
