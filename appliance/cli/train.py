"""`appliance train`: fine-tuning and sweeps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from appliance.cli import JsonOpt, app, console, follow_job, print_json, store, validated_settings

# -- train ---------------------------------------------------------------------------------


train_app = typer.Typer(help="Fine-tune on a run's prepared data (see also: train sweep).",
                        invoke_without_command=True)
app.add_typer(train_app, name="train")


def _parse_mix(values: list[str] | None) -> dict[str, float]:
    from appliance.errors import ConfigError

    mix: dict[str, float] = {}
    for value in values or []:
        run_id, _, weight = value.partition("=")
        try:
            mix[run_id] = float(weight or 1.0)
        except ValueError as exc:
            raise ConfigError(f"--mix {value!r}: the weight is not a number", "Write --mix RUN=0.5") from exc
    return mix


@train_app.callback()
def train(
    ctx: typer.Context,
    run: Annotated[str | None, typer.Option(help="Run whose prepared data to train on")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue this run from its last checkpoint")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe with training settings")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model in the store (default: the default)")] = None,
    method: Annotated[str | None, typer.Option(help="lora, qlora or full")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the training data")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Time budget: the steps that fit (measured on the "
                                                      "first steps) and a schedule fitted to them")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per forward pass")] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Longest row in tokens")] = None,
    backend: Annotated[str | None, typer.Option(help="auto, unsloth or hf")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank")] = None,
    init_from: Annotated[str | None, typer.Option(help="Start from this run's trained adapter (sequential)")]
    = None,
    mix: Annotated[list[str] | None, typer.Option(help="Mix in another run's data: RUN=WEIGHT (repeatable)")]
    = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune on a run's prepared data, as a resumable job with checkpoints."""
    if ctx.invoked_subcommand is not None:
        return
    from appliance.config import Settings, TrainConfig, load_settings

    st = store()
    if (run is None) == (resume is None):
        from appliance.errors import ConfigError

        raise ConfigError("give either --run RUN (a new training) or --resume RUN", "See appliance train --help.")
    run_dir = st.run_dir(resume or run or "")
    settings: dict[str, Any] = {}
    if resume:
        settings = _recorded_train_settings(st.run_config(run_dir), run_dir)
    from_recipe = load_settings(recipe) if recipe is not None else Settings()
    settings.update(from_recipe)
    overrides = {"base_model": base_model, "method": method, "max_steps": max_steps, "epochs": epochs,
                 "max_minutes": max_minutes,
                 "learning_rate": learning_rate, "batch_size": batch_size, "max_seq_len": max_seq_len,
                 "backend": backend, "rank": rank, "init_from": init_from, "mix": _parse_mix(mix) or None}
    given = {k: v for k, v in overrides.items() if v is not None}
    settings.update(given)
    settings.update(store=str(st.root), resume=resume is not None)
    origins = {k: v for k, v in from_recipe.origins.items() if k not in given}
    cfg = validated_settings(TrainConfig, settings, origins)
    done = follow_job("train", run_dir, cfg, quiet=as_json, record=cfg.model_dump(mode="json", exclude={"resume"}))
    if as_json:
        print_json({"run": run_dir.name, **done.result})
        return
    r = done.result
    eval_text = f", validation loss {r['eval_loss']:.4f}" if r.get("eval_loss") is not None else ""
    console.print(f"[green]Trained[/] {r['steps']} steps ({r['backend']}, {r['method']}): train loss "
                  f"{r['train_loss']:.4f}{eval_text}, {r['real_tokens']:,} tokens in {r['seconds']} s "
                  f"-> {r['adapter']}")


def _recorded_train_settings(config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The training settings run.yaml keeps for a run (to resume it with them)."""
    recorded = config.get("train") or {}
    if not isinstance(recorded, dict) or not all(isinstance(k, str) for k in recorded):
        from appliance.errors import StoreError

        raise StoreError(f"{run_dir / 'run.yaml'}: the train settings are damaged (not a mapping of names to values)",
                         "Start the training again with --run and a --recipe instead of --resume.")
    return dict(recorded)


def _grid_values(text: str | None, cast: Callable[[str], Any], option: str) -> list[Any] | None:
    if not text:
        return None
    try:
        return [cast(v) for v in text.split(",")]
    except ValueError as exc:
        from appliance.errors import ConfigError

        raise ConfigError(f"--{option} {text!r}: every value must be a number", f"Write e.g. --{option} "
                          f"{'1e-4,3e-4' if cast is float else '8,16'}") from exc


@train_app.command("sweep")
def train_sweep(
    run: Annotated[str, typer.Option(help="Run whose prepared data the trials train on")],
    learning_rate: Annotated[str | None, typer.Option(help="Comma-separated values, e.g. 1e-4,3e-4")] = None,
    rank: Annotated[str | None, typer.Option(help="Comma-separated LoRA ranks, e.g. 8,16")] = None,
    epochs: Annotated[str | None, typer.Option(help="Comma-separated epoch counts")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Short budget per trial, in steps")] = 50,
    sample: Annotated[int | None, typer.Option(help="Random search: try only this many combinations")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe with the other settings")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Short trainings over a grid of learning rate, rank and epochs, ranked by validation loss."""
    from appliance.config import Settings, TrainConfig, load_settings
    from appliance.errors import ConfigError
    from appliance.train.sweep import run_sweep

    st = store()
    run_dir = st.run_dir(run)
    grid = {k: v for k, v in {"learning_rate": _grid_values(learning_rate, float, "learning-rate"),
                              "rank": _grid_values(rank, int, "rank"),
                              "epochs": _grid_values(epochs, float, "epochs")}.items() if v}
    if not grid:
        raise ConfigError("nothing to sweep", "Give at least one of --learning-rate, --rank, --epochs as a list.")
    from_recipe = load_settings(recipe) if recipe is not None else Settings()
    settings: dict[str, Any] = {**from_recipe, "store": str(st.root), "max_steps": max_steps}
    origins = {k: v for k, v in from_recipe.origins.items() if k not in ("store", "max_steps", *grid)}
    base = validated_settings(TrainConfig, settings, origins)
    for key, values in grid.items():
        for value in values:
            validated_settings(TrainConfig, {**settings, key: value}, origins)
    ranked = run_sweep(base, run_dir, grid, sample)
    if as_json:
        print_json({"run": run, "trials": ranked})
        return
    table = Table(title=f"Sweep of run {run}, ranked by validation loss")
    for column in ("rank", *grid.keys(), "eval loss", "train loss", "seconds"):
        table.add_column(column)
    for place, trial in enumerate(ranked, 1):
        loss = f"{trial['eval_loss']:.4f}" if trial.get("eval_loss") is not None else trial.get("error", "?")
        table.add_row(str(place), *(str(trial[k]) for k in grid), loss,
                      f"{trial.get('train_loss', float('nan')):.4f}", str(trial.get("seconds", "")))
    console.print(table)

