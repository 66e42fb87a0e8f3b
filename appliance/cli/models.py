"""`appliance models`: the store's base models."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from appliance.cli import JsonOpt, app, console, follow_job, print_json, store
from appliance.cli.options import Settings, config_options
from appliance.config import ImportConfig
from appliance.fields import validated
from appliance.records import ImportResult
from appliance.store import ModelInfo

models_app = typer.Typer(help="The model store: list, show, import and remove base models.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")

# -- models --------------------------------------------------------------------------------


def _fmt_params(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


@models_app.command("list")
def models_list(as_json: JsonOpt = False) -> None:
    """Imported base models, and catalog models that can be imported."""
    from appliance import pipeline_plan

    st = store()
    imported = st.list_models()
    names = {m.name for m in imported}
    available = [e for e in st.catalog() if e.name not in names]
    machine = pipeline_plan.Machine.here(st.root)
    fit = {m.name: _fit(machine, partial(pipeline_plan.read_config, st.model_dir(m.name) / "config.json"))
           for m in imported}
    fit |= {e.name: _fit(machine, partial(_catalog_config, e)) for e in available}
    if as_json:
        print_json({"models": [m.model_dump() | {"fits": fit[m.name]} for m in imported],
                     "available": [e.model_dump() | {"fits": fit[e.name]} for e in available]})
        return
    table = Table(title=f"Models in {st.root}")
    for column in ("name", "architecture", "params", "context", "dtype", "chat", "LoRA", "QLoRA", "serve"):
        table.add_column(column)
    for m in imported:
        table.add_row(m.name, m.architecture, _fmt_params(m.parameters), str(m.context_length or "?"),
                      m.dtype, "yes" if m.chat_template else "no", *fit[m.name].values())
    console.print(table)
    for entry in available:
        console.print(f"[dim]available: {entry.name} ({entry.description}); LoRA {fit[entry.name]['lora']}, "
                      f"serving {fit[entry.name]['serve']}; import with `appliance models import {entry.name}`[/]")
    gpu = "the GPU's free memory" if machine.gpu_free_mb is not None else "this machine's free memory (no GPU)"
    console.print(f"LoRA, QLoRA and serve: whether the stage fits in {gpu} with the default settings "
                  "(batch 4 x 1024 tokens; Q4_K_M with 4096 tokens of context); `appliance plan --base-model NAME` "
                  "shows every stage. A model on a USB disk: `appliance models import /media/USB/FOLDER` (see "
                  "README).")


def _fit(machine: Any, config: Callable[[], dict[str, Any]]) -> dict[str, str]:
    from appliance import pipeline_plan
    from appliance.errors import ApplianceError

    try:
        return pipeline_plan.fit_summary(config(), machine)
    except (ApplianceError, KeyError, TypeError, ValueError) as exc:
        unknown = f"unknown ({type(exc).__name__})"
        return {"lora": unknown, "qlora": unknown, "serve": unknown}


def _catalog_config(entry: Any) -> dict[str, Any]:
    """What the plan needs of a catalog entry's config, from the GGUF its package ships (not hashed, as an import
    would)."""
    from importlib import metadata

    from appliance import pipeline_plan
    from appliance.errors import StoreError

    _kind, _, package = entry.source.partition(":")
    try:
        files = metadata.distribution(package).files or []
    except metadata.PackageNotFoundError as exc:
        raise StoreError(f"the package {package!r} is not installed", "Run ./install.sh.") from exc
    found = next((f for f in files if f.name == entry.file), None)
    if found is None:
        raise StoreError(f"package {package!r} has no file {entry.file!r}", "Reinstall the package.")
    return pipeline_plan.config_from_gguf(Path(str(found.locate())))


@models_app.command("show")
def models_show(name: str, as_json: JsonOpt = False) -> None:
    """Everything known about one imported model, with the sha256 of each file."""
    info: ModelInfo = store().get_model(name)
    if as_json:
        print_json(info.model_dump())
        return
    rows = [
        ("name", info.name), ("architecture", f"{info.architecture} ({info.model_type})"),
        ("layers", str(info.num_layers)), ("hidden size", str(info.hidden_size)),
        ("parameters", f"{info.parameters:,} ({_fmt_params(info.parameters)})"),
        ("context length", str(info.context_length)), ("vocabulary", str(info.vocab_size)),
        ("dtype", info.dtype), ("chat template", "yes" if info.chat_template else "no"),
        ("special tokens", ", ".join(f"{k}={v}" for k, v in info.special_tokens.items() if v)),
        ("license", info.license or "unknown"),
        ("source", f"{info.source.kind}: {info.source.location}"
         + (f" ({info.source.package} {info.source.package_version})" if info.source.package else "")),
        ("imported", f"{info.imported_at} by appliance {info.appliance_version}"),
    ]
    table = Table(show_header=False, title=info.name)
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    files = Table(title="files")
    for column in ("file", "size", "sha256"):
        files.add_column(column)
    for fname, f in info.files.items():
        files.add_row(fname, f"{f.size:,}", f.sha256)
    console.print(files)
    for note in info.notes:
        console.print(f"[yellow]note:[/] {note}")


@models_app.command("import")
@config_options(ImportConfig, arguments=("source",))
def models_import(settings: Settings, as_json: JsonOpt = False) -> None:
    """Import a base model into the store, atomically, as a child job."""
    st = store()
    cfg = validated(ImportConfig, {**settings, "store": str(st.root)})
    result = follow_job("import", st.new_job_dir("import"), cfg, ImportResult, quiet=as_json)
    if as_json:
        print_json(result.model_dump(mode="json"))
    else:
        console.print(f"[green]Imported[/] {result.name}: {_fmt_params(result.parameters)} parameters, "
                      f"{result.dtype}, in {result.seconds} s -> {result.path}")


@models_app.command("remove")
def models_remove(
    name: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove an imported base model from the store."""
    st = store()
    st.get_model(name)
    if not yes and not typer.confirm(f"Remove {name} from {st.root}?"):
        raise typer.Exit(1)
    st.remove_model(name)
    console.print(f"Removed {name}.")


