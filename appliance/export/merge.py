"""Merge a run's adapter onto its 16-bit base model, into `merged/`, a tensor at a time.

The base is always read fresh from the store in its 16-bit release, never in 4 bits: a LoRA
merged into a 4-bit base picks up the rounding of the 4-bit weights, which is how other tools
end up exporting a model that is not the one they trained. The merge streams over the base's
safetensors shards: each tensor the adapter changes is read a block of rows at a time, gets
`scale * B @ A` added in float32, is rounded once to the base's own dtype and written to the
matching output shard; every other tensor is copied as it is. Memory stays at a few blocks
whatever the model's size, and the disk the merged model needs is checked before anything is
written. Each changed tensor is checked as it is written against the adapter applied the way
LoRA applies it. `merged/merge.json` records which adapter it holds, so a second export of the
same adapter sees the merge is done and says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import faults, tensorfile
from appliance.errors import ApplianceError, is_disk_full
from appliance.events import Emitter
from appliance.fsutil import fsync_dir, replace_dir, sha256_file
from appliance.hardware import disk_free_mb, release_freed_memory
from appliance.records import MergeResult
from appliance.run import Run

SENTENCEPIECE = "tokenizer.model"  # Gemma, Phi-3, Llama 2 and Mistral tokenizers: what their converters read
GENERIC_TOKENIZER = "TokenizersBackend"  # the class transformers writes for a tokenizer loaded from tokenizer.json


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


def _sentencepiece(adapter_dir: Path, base_dir: Path) -> Path | None:
    """The SentencePiece model of the run's tokenizer, which the converters of the SentencePiece families read
    (transformers saves a tokenizer as tokenizer.json alone): the adapter's, else the base model's."""
    return next((d / SENTENCEPIECE for d in (adapter_dir, base_dir) if (d / SENTENCEPIECE).is_file()), None)


def _converters_can_read(merged: Path, adapter_dir: Path, base_dir: Path) -> bool:
    """Whether a merged folder holds what `_keep_what_converters_read` gives it (one merged before may not)."""
    if _sentencepiece(adapter_dir, base_dir) is not None and not (merged / SENTENCEPIECE).is_file():
        return False
    try:
        return "added_tokens_decoder" in json.loads((merged / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _keep_what_converters_read(folder: Path, tokenizer: Any, base_dir: Path) -> None:
    """Give the saved tokenizer_config.json what llama.cpp's converters read in the families' own files, which
    transformers no longer writes: the added tokens with their types (a SentencePiece converter marks the special
    ones there; without them llama.cpp splits Gemma's `<start_of_turn>` into pieces) and the base model's tokenizer
    class where a generic one was written (Phi-4's converter takes a BPE vocabulary by its class name)."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    base_config = base_dir / "tokenizer_config.json"
    base_class = json.loads(base_config.read_text(encoding="utf-8")).get("tokenizer_class") \
        if base_config.is_file() else None
    if base_class and config.get("tokenizer_class") in (None, GENERIC_TOKENIZER):
        config["tokenizer_class"] = base_class
    config.setdefault("added_tokens_decoder", {
        str(token_id): {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                        "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}
        for token_id, token in sorted(tokenizer.added_tokens_decoder.items())})
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def merge(run: Run, base_dir: Path, emit: Emitter, device: str = "auto") -> MergeResult:
    """`merged/` for the run's adapter; reused when it already holds this adapter."""
    adapter_dir = run.adapter_dir
    if not adapter_dir.is_dir():
        raise ExportError(f"run {run.id} has no trained adapter", f"Train it first: appliance train --run {run.id}")
    digest = sha256_file(adapter_weights(adapter_dir))
    final = run.merged_dir
    previous = run.merge_record()
    if previous is not None and previous.adapter_sha256 == digest and _complete(final) \
            and _converters_can_read(final, adapter_dir, base_dir):
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
    from transformers import AutoTokenizer

    full = is_full_model(adapter_dir)
    source = adapter_dir if full else base_dir
    save_dtype = _dtype_of(base_dir)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    deltas = {} if full else lora_deltas(adapter_dir)
    target = _device(device)
    plan = _layout(source, tensorfile.dtype_name(getattr(torch, save_dtype)))
    _match(deltas, {name: shape for _p, layout, _m in plan for name, _d, shape in layout}, base_dir.name)
    _check_space(folder, plan)
    folder.mkdir(parents=True, exist_ok=True)
    check = Check()
    total = sum(len(layout) for _path, layout, _meta in plan)
    done = 0
    for path, layout, metadata in plan:
        with tensorfile.Reader(path) as reader:
            writer = tensorfile.Writer(folder / path.name, layout, metadata)
            try:
                for name, dtype, _shape in layout:
                    emit.check_cancelled()
                    emit.progress(f"merging the adapter on {target}", done, total)
                    _stream(reader, writer, reader.tensors[name], dtype, deltas.get(name), target, check)
                    release_freed_memory()  # the next tensor's blocks have another size
                    done += 1
            finally:
                writer.close()
    _write_index(source, folder, plan)
    config["use_cache"] = True
    config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = save_dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if (source / "generation_config.json").is_file():
        shutil.copy2(source / "generation_config.json", folder / "generation_config.json")
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(folder))
    model = _sentencepiece(adapter_dir, base_dir)
    if model is not None and not (folder / SENTENCEPIECE).is_file():  # saved as tokenizer.json alone
        shutil.copy2(model, folder / SENTENCEPIECE)
    _keep_what_converters_read(folder, tokenizer, base_dir)
    if not (folder / "chat_template.jinja").is_file() and isinstance(tokenizer.chat_template, str):
        (folder / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    emit.progress("merged", total, total)
    return MergeResult(merged=str(folder), adapter_sha256=digest, base_model=base_dir.name, dtype=save_dtype,
                       device=target, reused=False, seconds=0.0, tensors_merged=len(deltas),
                       check="none: a fully fine-tuned model is copied" if full else "layer-wise",
                       max_relative_error=None if full else round(check.worst, 6), worst_tensor=check.worst_name)


def _dtype_of(base_dir: Path) -> str:
    """The base's 16-bit (or 32-bit) type, which the merged model keeps; bfloat16 when its config says none."""
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    named = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    return named if named in ("bfloat16", "float16", "float32") else "bfloat16"


@dataclass(frozen=True, slots=True)
class Delta:
    """One tensor's change: `scale * B @ A` (its rows), or for an embedding its transpose; with `base`, the
    adapter also carries the layer's own weights (peft saves an embedding's), which replace the base's."""

    a: Any  # float32, (r, in) or, for an embedding, (r, rows)
    b: Any  # float32, (out, r) or, for an embedding, (dim, r)
    scale: float
    embedding: bool
    base: Any = None

    def rows(self, start: int, stop: int) -> Any:
        if self.embedding:
            return (self.b @ self.a[:, start:stop]).T * self.scale
        return (self.b[start:stop] @ self.a) * self.scale


def _match(deltas: dict[str, Delta], shapes: dict[str, tuple[int, ...]], base: str) -> None:
    """Refuses, before anything is written, an adapter whose layers the base model does not have."""
    missing = sorted(set(deltas) - set(shapes))
    if missing:
        raise ExportError(f"the adapter changes {len(missing)} tensors the base model {base} does not have "
                          f"(first: {missing[0]})", "Export with the base model the run was trained on.")
    for name, delta in deltas.items():
        made = (delta.a.shape[1], delta.b.shape[0]) if delta.embedding else (delta.b.shape[0], delta.a.shape[1])
        carried = tuple(delta.base.shape) if delta.base is not None else shapes[name]
        if made != shapes[name] or carried != shapes[name]:
            raise ExportError(f"the adapter's {name} is {made if made != shapes[name] else carried}, the base model "
                              f"{base}'s is {shapes[name]}", "Export with the base model the run was trained on, "
                              "as imported (a resized vocabulary is not merged).")


def lora_deltas(adapter_dir: Path) -> dict[str, Delta]:
    """The base tensors a LoRA adapter changes, by name, each with its `B`, `A` and scale; refuses an
    adapter of a kind this merge does not apply, naming what it has."""
    import math

    from safetensors.torch import load_file

    settings = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    unsupported = [what for what, present in (
        ("DoRA (use_dora)", settings.get("use_dora")),
        ("fan_in_fan_out layers", settings.get("fan_in_fan_out")),
        (f"trained biases (bias={settings.get('bias')})", settings.get("bias", "none") != "none"),
        ("fully trained modules (modules_to_save)", settings.get("modules_to_save")),
        ("layer replication", settings.get("layer_replication")),
        ("target parameters", settings.get("target_parameters")),
        ("biases on the LoRA layers (lora_bias)", settings.get("lora_bias")),
        ("activated LoRA (alora_invocation_tokens)", settings.get("alora_invocation_tokens")),
        (f"adapter type {settings.get('peft_type')}", settings.get("peft_type", "LORA") != "LORA"),
    ) if present]
    if unsupported:
        raise ExportError(f"the adapter in {adapter_dir} uses {', '.join(unsupported)}, which the export does "
                          "not merge", "Train with plain LoRA (the appliance's default settings) and export again.")
    weights = load_file(str(adapter_weights(adapter_dir)))
    alpha = float(settings.get("lora_alpha", 8))
    patterns: dict[str, Any] = settings.get("alpha_pattern") or {}
    deltas = {}
    for key in weights:
        for a_suffix, b_suffix, embedding in ((".lora_A.weight", ".lora_B.weight", False),
                                              (".lora_embedding_A", ".lora_embedding_B", True)):
            if not key.endswith(a_suffix):
                continue
            module = key.removesuffix(a_suffix)
            b_key = module + b_suffix
            if b_key not in weights:
                raise ExportError(f"the adapter in {adapter_dir} has {key} but no {b_key}",
                                  "The adapter is damaged: train the run again.")
            name = module.removeprefix("base_model.model.")
            a, b = weights[key].float(), weights[b_key].float()
            rank = a.shape[0]
            module_alpha = float(next((v for p, v in patterns.items() if re.match(rf"(.*\.)?({p})$", name)), alpha))
            scale = module_alpha / (math.sqrt(rank) if settings.get("use_rslora") else rank)
            own = weights.get(module + ".base_layer.weight")
            deltas[name + ".weight"] = Delta(a, b, scale, embedding, None if own is None else own.float())
    other = [k for k in weights if ".lora_" not in k
             and not (k.endswith(".base_layer.weight") and k.removeprefix("base_model.model.").removesuffix(
                 ".base_layer.weight") + ".weight" in deltas)]
    if other or not deltas:
        raise ExportError(f"the adapter in {adapter_dir} holds {other[0] if other else 'no LoRA weights'}",
                          "Train with plain LoRA (the appliance's default settings) and export again.")
    return deltas


ROWS_AT_ONCE = 1 << 22  # elements of one tensor handled at a time: 16 MB in float32


class Check:
    """The layer-wise check: each changed tensor as written, against the base and the adapter applied as
    LoRA applies them (`W x + scale * B (A x)`, never forming `B A`), on a few random inputs."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.worst_name: str | None = None

    def add(self, name: str, base: Any, merged: Any, delta: Delta, start: int, stop: int, probe: Any) -> None:
        import torch

        with torch.no_grad():
            if delta.embedding:  # a lookup: the rows themselves are what the model reads
                reference = base.float() + (delta.b @ delta.a[:, start:stop]).T * delta.scale
                got = merged.float()
            else:
                reference = base.float() @ probe + (delta.b[start:stop] @ (delta.a @ probe)) * delta.scale
                got = merged.float() @ probe
            error = float((reference - got).abs().max() / reference.abs().max().clamp_min(1e-12))
        if error > self.worst or self.worst_name is None:
            self.worst, self.worst_name = error, name


def _stream(reader: tensorfile.Reader, writer: tensorfile.Writer, info: tensorfile.TensorInfo, dtype: str,
            delta: Delta | None, device: str, check: Check) -> None:
    """One tensor from `reader` to `writer`: copied as it is, cast, or with its delta added, a block of rows
    at a time; the delta in float32, rounded once to `dtype`."""
    import torch

    if delta is None and dtype == info.dtype:
        for piece in reader.chunks(info):
            writer.write(info.name, piece)
        return
    rows = info.shape[0] if info.shape else 1
    per_row = max(1, info.numel // rows)
    step = max(1, ROWS_AT_ONCE // per_row)
    out_dtype = tensorfile.torch_dtype(dtype)
    probe = None
    if delta is not None:
        delta = Delta(delta.a.to(device), delta.b.to(device), delta.scale, delta.embedding, delta.base)
        if not delta.embedding:
            probe = torch.randn(per_row, 4, generator=torch.Generator().manual_seed(0)).to(device)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        if delta is not None and delta.base is not None:
            block = delta.base[start:stop]
        else:
            block = reader.rows(info, start, stop) if info.shape else reader.read(info.name)
        if delta is None:
            writer.write(info.name, block.to(out_dtype))
            continue
        base = block.to(device)
        merged = (base.float() + delta.rows(start, stop)).to(out_dtype)
        check.add(info.name, base, merged, delta, start, stop, probe)
        writer.write(info.name, merged.cpu())


def _layout(source: Path, save_dtype: str) -> list[tuple[Path, list[tuple[str, str, tuple[int, ...]]], dict[str, str]]]:
    """Per shard of `source`: the merged shard's tensors (name, type, shape) in file order, and its metadata."""
    plan = []
    for path in tensorfile.shards(source):
        with tensorfile.Reader(path) as reader:
            ordered = sorted(reader.tensors.values(), key=lambda t: t.begin)
            layout = [(t.name, save_dtype if t.dtype in tensorfile.FLOATS else t.dtype, t.shape) for t in ordered]
            plan.append((path, layout, {**reader.metadata, "format": "pt"}))
    if not plan:
        raise ExportError(f"{source} holds no safetensors weights", "Import the model again: appliance models import.")
    return plan


def _check_space(folder: Path, plan: list[Any]) -> None:
    need = sum(tensorfile.nbytes(d, s) for _p, layout, _m in plan for _n, d, s in layout) + (64 << 20)
    free = disk_free_mb(folder) * (1 << 20)
    if free < need:
        raise ExportError(f"the merged model needs {need / 1e9:.2f} GB and the store's disk has {free / 1e9:.2f} GB "
                          "free", "Free space on the store's disk (df -h shows it) and export again; nothing was "
                          "written.")


def _write_index(source: Path, folder: Path, plan: list[Any]) -> None:
    index = source / "model.safetensors.index.json"
    if not index.is_file():
        return
    data = json.loads(index.read_text(encoding="utf-8"))
    total = sum(tensorfile.nbytes(d, s) for _p, layout, _m in plan for _n, d, s in layout)
    data["metadata"] = {**(data.get("metadata") or {}), "total_size": total}
    (folder / index.name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _device(choice: str) -> str:
    """Where the merge's arithmetic runs: a block of rows at a time fits any GPU, so CUDA when there is one."""
    import torch

    if choice != "auto":
        return choice
    return "cuda" if torch.cuda.is_available() else "cpu"


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
