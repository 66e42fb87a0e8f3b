"""Which GGUF file to serve, with the chat contract it was trained and verified with.

`resolve` accepts what a user has at hand: a run id (the run's verified export), the name the
export gave the model, or a path to a .gguf file. A file that came out of `appliance export`
brings its contract (chat template, stop tokens, training system prompt, task and labels) from
the `verification.json` beside it, and counts as verified only when its sha256 is the one the
run's signed manifest recorded. A foreign .gguf is served with the template in its own metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, StoreError
from appliance.fsutil import inside, sha256_file
from appliance.records import FileReport, Verification
from appliance.run import Run, exported_models
from appliance.store import Store
from appliance.templating import ChatContract, NormalForm, normalized

DEFAULT_CONTEXT = 4096


class ServeError(ApplianceError):
    title = "Cannot serve this model"


@dataclass
class ServedModel:
    path: Path
    name: str  # what /v1/models lists and what clients pass as `model`
    sha256: str
    quant: str | None = None
    run: Run | None = None
    contract: ChatContract | None = None
    verified: bool = False  # the file is the one the run's manifest recorded as passing the gate
    schema: dict[str, Any] | None = None  # the extraction schema of the run, when it has one
    notes: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str] | None:
        return self.contract.labels if self.contract is not None and self.contract.task == "classification" \
            else None


def resolve(store: Store, spec: str, quant: str | None = None) -> ServedModel:
    """The model named by `spec`: a run id, an exported model's name, or a .gguf path."""
    path = Path(spec).expanduser()
    if spec.endswith(".gguf") or path.is_file():
        if not path.is_file():
            raise ServeError(f"{path} does not exist", "Give the path of a .gguf file, a run id or an exported "
                             "model's name (`appliance models list` shows them).")
        return _from_file(path.resolve(), _run_of_file(store, path.resolve()))
    try:
        run = store.run(spec)
    except StoreError:
        run = _run_of_name(store, spec)
    return _from_run(run, quant)


def _run_of_name(store: Store, spec: str) -> Run:
    names = exported_models(store)
    if spec in names:
        return names[spec]
    listed = ", ".join(sorted(names)) or "none yet"
    raise ServeError(f"no run, exported model or .gguf file called {spec!r} (exported models: {listed})",
                     "Export a run first (`appliance export --run RUN`), or give a .gguf path.")


def _run_of_file(store: Store, path: Path) -> Run | None:
    """The run whose export folder holds `path` (in this store or another), when it is one."""
    run = Run(store, path.parent.parent)
    return run if run.gguf_dir == path.parent and run.exported else None


def _from_run(run: Run, quant: str | None) -> ServedModel:
    record = _verification(run)
    if record is None:
        raise ServeError(f"run {run.id} has no verified export", f"Export it first: appliance export --run {run.id}")
    files = record.served()
    if not files:
        raise ServeError(f"run {run.id} has no GGUF file that passed verification",
                         f"See {run.verification_path} for why, and export again.")
    chosen = quant.upper() if quant else _preferred(run, files)
    if chosen not in files:
        raise ServeError(f"run {run.id} has no verified {chosen} file (it has {', '.join(files)})",
                         f"Pick one of those with --quant, or export it: appliance export --run {run.id} "
                         f"--quant {chosen}")
    path = inside(run.gguf_dir, files[chosen].file, "exported file")
    if not path.is_file():
        raise ServeError(f"{path} passed verification but is no longer there",
                         f"Check the run with `appliance verify {run.id}`, and export again.")
    return _from_file(path, run, record=record, quant=chosen)


def _preferred(run: Run, files: dict[str, FileReport]) -> str:
    """The evaluation's recommendation when there is one, else Q4_K_M, else the smallest verified file."""
    try:
        comparison = run.comparison()
    except StoreError:
        comparison = None  # a damaged evaluation recommends nothing
    if comparison is not None and comparison.recommendation is not None and \
            comparison.recommendation.file in files:
        return comparison.recommendation.file
    if "Q4_K_M" in files:
        return "Q4_K_M"
    return min(files, key=lambda q: (files[q].size_bytes, q))


def _from_file(path: Path, run: Run | None, record: Verification | None = None,
               quant: str | None = None) -> ServedModel:
    if record is None and run is not None:
        record = _verification(run)
    entry = next((f for f in record.files if f.file == path.name), None) if record is not None else None
    digest = sha256_file(path)
    model = ServedModel(path=path, name=path.stem, sha256=digest, quant=quant or (entry.quant if entry else None),
                        run=run)
    if record is None or entry is None or record.contract is None or run is None:
        model.notes.append(f"{path.name} did not come out of `appliance export`: served with the chat template "
                           "in its own metadata, unverified")
        return model
    model.contract = record.contract
    model.name = record.name or path.stem
    recorded = _manifest_sha(run, path)
    model.verified = entry.passed and recorded == digest
    if recorded is None:
        model.notes.append(f"no run manifest vouches for {path.name}: served with its export's chat contract, "
                           "unverified")
    elif not model.verified:
        model.notes.append(f"{path.name} differs from the file the run's manifest recorded: it is not the file "
                           "that passed verification")
    model.schema = run.schema()
    return model


def _verification(run: Run) -> Verification | None:
    record = run.verification()
    return record if record is not None and record.contract is not None else None


def _manifest_sha(run: Run, path: Path) -> str | None:
    manifest = run.manifest()
    if manifest is None:
        return None
    entry = manifest.files.get(os.path.relpath(path, run.path))
    return entry.sha256 if entry is not None else None


# -- loading ---------------------------------------------------------------------------------

def context_length(path: Path) -> int:
    """The context the model was built for, capped at DEFAULT_CONTEXT (memory grows with it)."""
    from appliance.gguf_meta import read

    fields = read(path).fields
    trained = next((int(v) for k, v in fields.items() if k.endswith(".context_length")), DEFAULT_CONTEXT)
    return min(trained, DEFAULT_CONTEXT)


def check_memory(path: Path, n_ctx: int, cpu_share: float = 1.0) -> None:
    """Refuse to load a model whose file and KV cache do not fit in the memory available (llama.cpp maps the file;
    pages that do not stay in memory are read from disk at every token). `cpu_share`: what of them stays in RAM
    when layers go to a GPU (`offload`)."""
    from appliance import pipeline_plan as pp
    from appliance.gguf_meta import GGUFError

    try:
        kv = pp.kv_bytes_per_token(pp.config_from_gguf(path)) * n_ctx / 2**20
    except GGUFError:
        kv = 0.0  # a header without the model's shape: the file alone is planned
    need = pp.LLAMA_RUNTIME_MB + (path.stat().st_size / 2**20 + kv) * cpu_share
    pp.check_memory(need, pp.available_memory_mb(), f"serving {path.name} with {n_ctx} tokens of context",
                    "Serve with a smaller context (--ctx) or a smaller quantization (--quant).")


def load(model: ServedModel, n_ctx: int | None = None, threads: int | None = None) -> Any:
    """A llama_cpp.Llama for the model, with the contract's chat template and stop tokens, on the GPU as far as
    it fits there (`offload`)."""
    from appliance import offload, toolchain

    toolchain.preload_cuda()
    from llama_cpp import Llama

    threads = threads or os.cpu_count() or 1
    n_ctx = n_ctx or context_length(model.path)
    placed = offload.for_gguf(model.path, n_ctx)
    check_memory(model.path, n_ctx, placed.cpu_share)
    llm = Llama(str(model.path), n_ctx=n_ctx, n_threads=threads,
                n_threads_batch=threads, verbose=False, **placed.llama_settings())
    if model.contract is not None:
        llm.chat_handler = formatter(model, llm).to_chat_handler()
    return llm


def formatter(model: ServedModel, llm: Any) -> Any:
    """The chat formatter: the contract's template and stop tokens, else the file's own template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    contract = model.contract
    if contract is not None:
        return _normalizing(Jinja2ChatFormatter)(contract.normalization, contract.template,
                                                 eos_token=contract.eos_token, bos_token=contract.bos_token or "",
                                                 stop_token_ids=contract.stop_ids)
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ServeError(f"{model.path.name} has no chat template in its metadata",
                         "Export the model with `appliance export`, which writes the template it was trained with.")
    eos = llm.token_eos()
    bos = llm.token_bos()
    return Jinja2ChatFormatter(template, eos_token=llm._model.token_get_text(eos) if eos >= 0 else "",
                               bos_token=llm._model.token_get_text(bos) if bos >= 0 else "", stop_token_ids=[eos])


def _normalizing(base: Any) -> Any:
    """A chat formatter that first puts the messages' text in the tokenizer's normal form (Qwen's NFC): the
    tokenizer did so for training, llama.cpp does not, and the same text must split into the same tokens."""

    class Normalizing(base):  # type: ignore[misc, valid-type]
        def __init__(self, form: NormalForm | None, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.form = form

        def __call__(self, *, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
            return super().__call__(messages=normalized(messages, self.form), **kwargs)

    return Normalizing


def prompt_tokens(llm: Any, chat_format: Any, messages: list[dict[str, Any]]) -> int:
    """How many tokens the rendered conversation takes, as llama.cpp will count them."""
    rendered = chat_format(messages=messages)
    return len(llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True))


# -- structured output -----------------------------------------------------------------------

def grammar(model: ServedModel) -> tuple[str, str] | None:
    """A GBNF grammar that holds answers to the run's task (one of the labels, or JSON of the
    extraction schema), with what it constrains to; None for free chat."""
    if model.labels:
        return " | ".join(_gbnf_literal(label) for label in model.labels).join(("root ::= ", "\n")), "labels"
    if model.schema is not None and model.contract is not None and model.contract.task == "extraction":
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        return json_schema_to_gbnf(json.dumps(model.schema)), "json-schema"
    return None


def _gbnf_literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'
