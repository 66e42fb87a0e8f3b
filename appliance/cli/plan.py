"""`appliance plan`: what every stage of the pipeline needs for a model, against this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from appliance.cli import JsonOpt, app, console, print_json, store
from appliance.cli.options import Settings, config_options
from appliance.cli.train import RecipeOpt, _settings
from appliance.config import TrainConfig
from appliance.errors import ConfigError
from appliance.fields import validated


@app.command("plan")
@config_options(TrainConfig, only=("method", "rank", "batch_size", "max_seq_len", "gradient_checkpointing"))
def plan(
    settings: Settings,
    base_model: Annotated[str | None, typer.Option(help="Base model in the store (default: the default)")] = None,
    config: Annotated[Path | None, typer.Option(help="config.json of a model that is not in the store (its weights "
                                                "are not needed)")] = None,
    source: Annotated[Path | None, typer.Option(help="A model folder (or .gguf) you are about to import: planned "
                                                "with its own config, linked or copied as the import would")] = None,
    quant: Annotated[list[str] | None, typer.Option("--quant", help="Quantizations the export makes "
                                                    "(default: Q4_K_M)")] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Context the endpoint serves, in tokens")] = 4096,
    recipe: RecipeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Memory and disk of every stage (import, train, merge, convert, quantize, gate, evaluate, serve) for a
    model, from its config.json alone, against this machine's free memory and the store's free disk."""
    from appliance import pipeline_plan as pp
    from appliance import quants

    if sum(x is not None for x in (base_model, config, source)) > 1:
        raise ConfigError("give one of --base-model, --config and --source", "See appliance plan --help.")
    st = store()
    name, model_config, choices = _model(st, base_model, config, source)
    values, origins = _settings(recipe, settings)
    choices.train = validated(TrainConfig, values, origins)
    try:
        choices.quants = quants.parse_quants(quant or ["Q4_K_M"])
    except ValueError as exc:
        raise ConfigError(f"--quant: {exc}", "Give quantization names such as Q4_K_M or Q8_0.") from exc
    choices.context = ctx
    result = pp.pipeline(model_config, name, choices, pp.Machine.here(st.root))
    if as_json:
        print_json(result.as_dict())
        raise typer.Exit(0 if not result.refusals() else 1)
    _print(result)
    if result.refusals():
        raise typer.Exit(1)


def _model(st: Any, base_model: str | None, config: Path | None,
           source: Path | None) -> tuple[str, dict[str, Any], Any]:
    from appliance import pipeline_plan as pp
    from appliance.fsutil import same_file_system

    if config is not None:
        return str(config.parent.name), pp.read_config(config), pp.Choices()
    if source is not None:
        source = source.expanduser()
        if source.suffix.lower() == ".gguf" and source.is_file():
            return source.stem, pp.config_from_gguf(source), pp.Choices(import_kind="gguf")
        if not (source / "config.json").is_file():
            raise ConfigError(f"{source} holds no config.json", "Give a Hugging Face model folder or a .gguf file.")
        return source.name, pp.read_config(source / "config.json"), pp.Choices(
            link=same_file_system(source, st.root))
    name = st.resolve_model(base_model, "base model", "Import it first, or give --config or --source.")
    return name, pp.read_config(st.model_dir(name) / "config.json"), pp.Choices(import_kind="imported")


def _print(result: Any) -> None:
    from appliance.pipeline_plan import gb, gib

    machine = result.machine
    gpu = machine.gpu_free_mb is not None
    table = Table(title=f"{result.model}: {result.parameters / 1e9:.2f} B parameters")
    for column in ("stage", "memory", *(["GPU"] if gpu else []), "disk", "fits", "what it holds"):
        table.add_column(column)
    for stage in result.stages:
        fits = stage.fits(machine)
        mark = "[green]yes[/]" if fits else f"[red]no[/] ({stage.fix})" if stage.fix else "[red]no[/]"
        table.add_row(stage.stage, gib(stage.ram_mb), *([gib(stage.vram_mb)] if gpu else []), gb(stage.disk_mb),
                      mark, stage.detail)
    console.print(table)
    gpu_text = f", GPU {gib(machine.gpu_free_mb)} free" if gpu else ", no GPU"
    console.print(f"This machine: {gib(machine.ram_available_mb)} of {gib(machine.ram_total_mb)} memory available"
                  f"{gpu_text}, {machine.cores} cores; the store's disk has {gb(machine.disk_free_mb)} free, the "
                  f"pipeline writes {gb(result.disk_mb)}.")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    refusals = result.refusals()
    if refusals:
        for line in refusals:
            console.print(f"[red]does not fit:[/] {line}")
    else:
        console.print("[green]Every stage fits this machine.[/]")
