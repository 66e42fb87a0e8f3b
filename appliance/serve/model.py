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
from appliance.export.contract import ChatContract
from appliance.fsutil import inside, sha256_file
from appliance.store import Store

VERIFICATION = "verification.json"
DEFAULT_CONTEXT = 4096


class ServeError(ApplianceError):
    title = "Cannot serve this model"


@dataclass
class ServedModel:
    path: Path
    name: str  # what /v1/models lists and what clients pass as `model`
    sha256: str
    quant: str | None = None
    run_dir: Path | None = None
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
        return _from_file(path.resolve(), store)
    try:
        run_dir = store.run_dir(spec)
    except StoreError:
        run_dir = _run_of_name(store, spec)
    return _from_run(run_dir, quant)


def exported(store: Store) -> dict[str, Path]:
    """Every exported model in the store: its name and its run directory."""
    found: dict[str, Path] = {}
    if not store.runs_dir.is_dir():
        return found
    for run_dir in sorted(store.runs_dir.iterdir()):
        record = _verification(run_dir / "gguf")
        if record and record.get("name"):
            found[str(record["name"])] = run_dir
    return found


def _run_of_name(store: Store, spec: str) -> Path:
    names = exported(store)
    if spec in names:
        return names[spec]
    listed = ", ".join(sorted(names)) or "none yet"
    raise ServeError(f"no run, exported model or .gguf file called {spec!r} (exported models: {listed})",
                     "Export a run first (`appliance export --run RUN`), or give a .gguf path.")


def _from_run(run_dir: Path, quant: str | None) -> ServedModel:
    folder = run_dir / "gguf"
    record = _verification(folder)
    if record is None:
        raise ServeError(f"run {run_dir.name} has no verified export",
                         f"Export it first: appliance export --run {run_dir.name}")
    files = {f["quant"]: f for f in record.get("files", []) if f.get("passed") and f["quant"] not in ("LORA", "BASE")}
    if not files:
        raise ServeError(f"run {run_dir.name} has no GGUF file that passed verification",
                         f"See {folder / VERIFICATION} for why, and export again.")
    chosen = quant.upper() if quant else _preferred(run_dir, files)
    if chosen not in files:
        raise ServeError(f"run {run_dir.name} has no verified {chosen} file (it has {', '.join(files)})",
                         f"Pick one of those with --quant, or export it: appliance export --run {run_dir.name} "
                         f"--quant {chosen}")
    path = inside(folder, str(files[chosen]["file"]), "exported file")
    if not path.is_file():
        raise ServeError(f"{path} passed verification but is no longer there",
                         f"Check the run with `appliance verify {run_dir.name}`, and export again.")
    return _from_file(path, None, record=record, run_dir=run_dir, quant=chosen)


def _preferred(run_dir: Path, files: dict[str, dict[str, Any]]) -> str:
    """The evaluation's recommendation when there is one, else Q4_K_M, else the smallest verified file."""
    comparison = run_dir / "eval" / "comparison.json"
    if comparison.is_file():
        recommended = (json.loads(comparison.read_text(encoding="utf-8")).get("recommendation") or {}).get("file")
        if recommended in files:
            return str(recommended)
    if "Q4_K_M" in files:
        return "Q4_K_M"
    return min(files, key=lambda q: (int(files[q].get("size_bytes") or 0), q))


def _from_file(path: Path, store: Store | None, record: dict[str, Any] | None = None,
               run_dir: Path | None = None, quant: str | None = None) -> ServedModel:
    if record is None:
        record = _verification(path.parent)
        if record is not None and run_dir is None and (path.parent.parent / "manifest.json").is_file():
            run_dir = path.parent.parent
    entry = next((f for f in (record or {}).get("files", []) if f.get("file") == path.name), None)
    digest = sha256_file(path)
    model = ServedModel(path=path, name=path.stem, sha256=digest, quant=quant or (entry or {}).get("quant"),
                        run_dir=run_dir)
    if record is None or entry is None:
        model.notes.append(f"{path.name} did not come out of `appliance export`: served with the chat template "
                           "in its own metadata, unverified")
        return model
    model.contract = ChatContract.model_validate(record["contract"])
    model.name = str(record.get("name") or path.stem)
    recorded = _manifest_sha(run_dir, path) if run_dir is not None else None
    model.verified = bool(entry.get("passed")) and recorded == digest
    if recorded is None:
        model.notes.append(f"no run manifest vouches for {path.name}: served with its export's chat contract, "
                           "unverified")
    elif not model.verified:
        model.notes.append(f"{path.name} differs from the file the run's manifest recorded: it is not the file "
                           "that passed verification")
    if run_dir is not None and (run_dir / "data" / "schema.json").is_file():
        model.schema = json.loads((run_dir / "data" / "schema.json").read_text(encoding="utf-8"))
    return model


def _verification(folder: Path) -> dict[str, Any] | None:
    path = folder / VERIFICATION
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data if "contract" in data else None


def _manifest_sha(run_dir: Path, path: Path) -> str | None:
    manifest = run_dir / "manifest.json"
    if not manifest.is_file():
        return None
    files = json.loads(manifest.read_text(encoding="utf-8")).get("files", {})
    entry = files.get(os.path.relpath(path, run_dir))
    return entry.get("sha256") if isinstance(entry, dict) else None


# -- loading ---------------------------------------------------------------------------------

def context_length(path: Path) -> int:
    """The context the model was built for, capped at DEFAULT_CONTEXT (memory grows with it)."""
    from appliance.export.gguf_meta import read

    fields = read(path).fields
    trained = next((int(v) for k, v in fields.items() if k.endswith(".context_length")), DEFAULT_CONTEXT)
    return min(trained, DEFAULT_CONTEXT)


def load(model: ServedModel, n_ctx: int | None = None, threads: int | None = None) -> Any:
    """A llama_cpp.Llama for the model, with the contract's chat template and stop tokens."""
    from llama_cpp import Llama

    threads = threads or os.cpu_count() or 1
    llm = Llama(str(model.path), n_ctx=n_ctx or context_length(model.path), n_threads=threads,
                n_threads_batch=threads, verbose=False)
    if model.contract is not None:
        llm.chat_handler = formatter(model, llm).to_chat_handler()
    return llm


def formatter(model: ServedModel, llm: Any) -> Any:
    """The chat formatter: the contract's template and stop tokens, else the file's own template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    contract = model.contract
    if contract is not None:
        return Jinja2ChatFormatter(contract.template, eos_token=contract.eos_token,
                                   bos_token=contract.bos_token or "", stop_token_ids=contract.stop_ids)
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ServeError(f"{model.path.name} has no chat template in its metadata",
                         "Export the model with `appliance export`, which writes the template it was trained with.")
    eos = llm.token_eos()
    bos = llm.token_bos()
    return Jinja2ChatFormatter(template, eos_token=llm._model.token_get_text(eos) if eos >= 0 else "",
                               bos_token=llm._model.token_get_text(bos) if bos >= 0 else "", stop_token_ids=[eos])


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
