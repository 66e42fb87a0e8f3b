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
    processes: Annotated[int | None, typer.Option(help="Training processes on this machine (one per GPU): more "
                                                  "than one trains data-parallel through accelerate")] = None,
    nodes: Annotated[int | None, typer.Option(help="Machines training together, each running this command")]
    = None,
    node_rank: Annotated[int | None, typer.Option(help="This machine's place among --nodes (0: the main one)")]
    = None,
    main_address: Annotated[str | None, typer.Option(help="HOST:PORT of node 0, the same on every node")] = None,
    sharding: Annotated[str | None, typer.Option(help="ddp (a replica per device) or fsdp (weights sharded "
                                                 "across GPUs)")] = None,
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
                 "backend": backend, "rank": rank, "init_from": init_from, "mix": _parse_mix(mix) or None,
                 "processes": processes, "nodes": nodes, "node_rank": node_rank, "main_address": main_address,
                 "sharding": sharding}
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



@train_app.command("plan")
def train_plan(
    base_model: Annotated[str | None, typer.Option(help="Base model in the store (default: the default)")] = None,
    config: Annotated[Path | None, typer.Option(help="config.json of a model that is not in the store (its "
                                                "weights are not needed), e.g. to size a cluster for a 70B base")]
    = None,
    gpu_memory: Annotated[float, typer.Option(help="Memory of one GPU, in GiB")] = 24.0,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe with the training settings to plan for")] = None,
    method: Annotated[str | None, typer.Option(help="lora, qlora or full (default: each of them)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per forward pass")] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Longest row in tokens")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option(help="Recompute activations (what large models "
                                                                "need)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Memory per GPU with 1 to 8 processes, DDP and FSDP, and the fewest GPUs each method needs."""
    import json

    from appliance.config import Settings, TrainConfig, load_settings
    from appliance.errors import ConfigError
    from appliance.train import planner

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
        model_dir = st.model_dir(name)
        model_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        parameters = int(json.loads((model_dir / "source.json").read_text(encoding="utf-8"))["parameters"])
    from_recipe = load_settings(recipe) if recipe is not None else Settings()
    settings: dict[str, Any] = {**from_recipe, "store": str(st.root)}
    settings.update({k: v for k, v in {"batch_size": batch_size, "max_seq_len": max_seq_len,
                                       "gradient_checkpointing": gradient_checkpointing}.items() if v is not None})
    if settings.get("dtype", "auto") == "auto":
        settings["dtype"] = "bfloat16"  # what a GPU trains in
    base = validated_settings(TrainConfig, settings, from_recipe.origins)
    device_mb = gpu_memory * 1024
    methods = [method] if method else ["lora", "qlora", "full"]
    rows: list[dict[str, Any]] = []
    for chosen in methods:
        cfg = validated_settings(TrainConfig, {**base.model_dump(), "method": chosen}, {})
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
