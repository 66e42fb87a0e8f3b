"""`appliance train`: fine-tuning, sweeps and the memory plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from appliance.cli import JsonOpt, app, console, follow_job, print_json, store
from appliance.cli.options import Settings, config_options
from appliance.config import SWEEPABLE, SweepConfig, TrainConfig, load_settings
from appliance.config import Settings as FileSettings
from appliance.errors import ConfigError
from appliance.fields import validated
from appliance.records import SweepResult, TrainResult

train_app = typer.Typer(help="Fine-tune on a run's prepared data (see also: train sweep, train plan).",
                        invoke_without_command=True)
app.add_typer(train_app, name="train")

RecipeOpt = Annotated[Path | None, typer.Option(help="YAML recipe with training settings (the options given here "
                                                "override it)")]


def _settings(recipe: Path | None, given: Settings, start: dict[str, Any] | None = None) -> tuple[dict[str, Any],
                                                                                                  dict[str, str]]:
    """The recorded or empty settings, overridden by a recipe, overridden by the command line; with the recipe's
    lines for the settings that came from it."""
    from_recipe = load_settings(recipe) if recipe is not None else FileSettings()
    settings = {**(start or {}), **from_recipe, **given, "store": str(store().root)}
    origins = {k: v for k, v in from_recipe.origins.items() if k not in given}
    return settings, origins


@train_app.callback()
@config_options(TrainConfig, exclude=("store", "resume"))
def train(
    ctx: typer.Context,
    settings: Settings,
    run: Annotated[str | None, typer.Option(help="Run whose prepared data to train on")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue this run from its last checkpoint, with the "
                                               "settings it was started with")] = None,
    recipe: RecipeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune on a run's prepared data, as a resumable job with checkpoints."""
    if ctx.invoked_subcommand is not None:
        return
    if (run is None) == (resume is None):
        raise ConfigError("give either --run RUN (a new training) or --resume RUN", "See appliance train --help.")
    target = store().run(resume or run or "")
    recorded = target.settings("train") if resume else {}
    values, origins = _settings(recipe, settings, recorded)
    cfg = validated(TrainConfig, {**values, "resume": resume is not None}, origins)
    result = follow_job("train", target.path, cfg, TrainResult, quiet=as_json)
    if as_json:
        print_json({"run": target.id, **result.model_dump(mode="json")})
        return
    eval_text = f", validation loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    console.print(f"[green]Trained[/] {result.steps} steps ({result.backend}, {result.method}): train loss "
                  f"{result.train_loss:.4f}{eval_text}, {result.real_tokens:,} tokens in {result.seconds} s "
                  f"-> {result.adapter}")


@train_app.command("sweep")
@config_options(TrainConfig, only=SWEEPABLE, lists=True)
def train_sweep(
    settings: Settings,
    run: Annotated[str, typer.Option(help="Run whose prepared data the trials train on")],
    max_steps: Annotated[int, typer.Option(help="Short budget per trial, in steps")] = 50,
    sample: Annotated[int | None, typer.Option(help="Random search: try only this many of the combinations")]
    = None,
    recipe: RecipeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Short trainings over a grid of settings (each option takes the values to try), ranked by validation
    loss; each trial is a training job of its own."""
    target = store().run(run)
    values, origins = _settings(recipe, {"max_steps": max_steps})
    base = validated(TrainConfig, {k: v for k, v in values.items() if k not in settings}, origins)
    cfg = validated(SweepConfig, {"train": base.model_dump(), "grid": settings, "sample": sample,
                                  "store": values["store"]})
    result = follow_job("sweep", target.path, cfg, SweepResult, quiet=as_json)
    if as_json:
        print_json(result.model_dump(mode="json"))
        return
    print_sweep(result)


def print_sweep(result: SweepResult) -> None:
    grid = list(result.grid)
    table = Table(title=f"Sweep of run {result.run}, ranked by validation loss")
    for column in ("rank", *grid, "eval loss", "train loss", "seconds"):
        table.add_column(column)
    for place, trial in enumerate(result.trials, 1):
        loss = f"{trial.eval_loss:.4f}" if trial.eval_loss is not None else trial.error or "?"
        train_loss = f"{trial.train_loss:.4f}" if trial.train_loss is not None else ""
        table.add_row(str(place), *(str(trial.settings.get(k, "")) for k in grid), loss, train_loss,
                      str(trial.seconds or ""))
    console.print(table)


@train_app.command("plan")
@config_options(TrainConfig, only=("method", "batch_size", "max_seq_len", "gradient_checkpointing"))
def train_plan(
    settings: Settings,
    base_model: Annotated[str | None, typer.Option(help="Base model in the store (default: the default)")] = None,
    config: Annotated[Path | None, typer.Option(help="config.json of a model that is not in the store (its "
                                                "weights are not needed), e.g. to size a cluster for a 70B base")]
    = None,
    gpu_memory: Annotated[float, typer.Option(help="Memory of one GPU, in GiB")] = 24.0,
    recipe: RecipeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Memory per GPU with 1 to 8 processes, DDP and FSDP, and the fewest GPUs each method needs (every
    method unless --method names one)."""
    from appliance import planner

    st = store()
    if config is not None:
        try:
            model_config = json.loads(config.read_text(encoding="utf-8"))
            parameters = planner.model_params(model_config)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{config}: not a readable model config.json ({type(exc).__name__}: {exc})",
                              "Give the config.json of a Hugging Face causal language model.") from exc
        name = str(model_config.get("_name_or_path") or config.parent.name)
    else:
        name = st.resolve_model(base_model, "base model", "Import it first, or give --config.")
        model_config = json.loads((st.model_dir(name) / "config.json").read_text(encoding="utf-8"))
        parameters = st.get_model(name).parameters
    method = settings.pop("method", None)
    values, origins = _settings(recipe, settings)
    if values.get("dtype", "auto") == "auto":
        values["dtype"] = "bfloat16"  # what a GPU trains in
    base = validated(TrainConfig, values, origins)
    device_mb = gpu_memory * 1024
    rows: list[dict[str, Any]] = []
    for chosen in [method] if method else ["lora", "qlora", "full"]:
        cfg = validated(TrainConfig, {**base.model_dump(), "method": chosen})
        per: dict[str, dict[int, float]] = {}
        for sharding in ("ddp", "fsdp"):
            per[sharding] = {n: planner.plan_from_config(cfg.model_copy(update={"processes": n, "sharding": sharding}),
                                                         model_config, parameters, cfg.max_seq_len, "cuda",
                                                         device_mb).peak_mb / 1024 for n in (1, 2, 4, 8)}
        fewest = {s: planner.devices_needed(cfg.model_copy(update={"sharding": s}), model_config, parameters,
                                            cfg.max_seq_len, device_mb) for s in ("ddp", "fsdp")}
        rows.append({"method": chosen, "per_gpu_gib": per,
                     "fewest_gpus": {s: (found[0] if found else None) for s, found in fewest.items()}})
    if as_json:
        print_json({"model": name, "parameters": parameters, "gpu_memory_gib": gpu_memory,
                    "batch_size": base.batch_size, "max_seq_len": base.max_seq_len,
                    "gradient_checkpointing": base.gradient_checkpointing, "plans": rows})
        return
    checkpointed = ", gradient checkpointing" if base.gradient_checkpointing else ""
    table = Table(title=f"{name} ({parameters / 1e9:.2f} B parameters), batch {base.batch_size} x "
                        f"{base.max_seq_len} tokens{checkpointed}: GiB per GPU")
    for column in ("method", "sharding", "1 GPU", "2", "4", "8", f"fewest {gpu_memory:g} GiB GPUs"):
        table.add_column(column)
    for row in rows:
        for sharding in ("ddp", "fsdp"):
            fewest_text = str(row["fewest_gpus"][sharding] or "none fits")
            table.add_row(row["method"], sharding.upper(), *(f"{v:.1f}" for v in row["per_gpu_gib"][sharding].values()),
                          fewest_text)
    console.print(table)
    console.print("DDP keeps a whole replica on every GPU (more GPUs: more throughput, not more room); FSDP shards "
                  "the weights and optimizer state (`appliance train --processes N --sharding fsdp`).")
