"""`appliance quickstart`: the whole product on the embedded default model and the shipped sample.

Private data in (PII redacted, report printed), a verified on-premises model out, with numbers:
prepare -> train within a time budget -> export Q8_0 and Q4_K_M through the verification gate ->
evaluate base zero-shot, few-shot, the fine-tuned adapter and every exported file on the same
test rows -> one summary table and the commands to go on with. Every stage is an ordinary job in a
new run, so running it again never touches an earlier run, and each stage can be repeated on its
own with the command it prints.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from rich.table import Table

from appliance.cli import JsonOpt, app, console, err_console, follow_job, print_json, store
from appliance.cli.data import print_data_summary
from appliance.cli.evaluate import interval
from appliance.records import DataReport, DataResult, EvalResult, ExportResult, ImportResult, TrainResult

RECIPE = Path(__file__).resolve().parent.parent / "train" / "recipes" / "smollm2-cpu.yaml"
QUANTS = ["Q8_0", "Q4_K_M"]
R = TypeVar("R", bound=BaseModel)


@app.command("quickstart")
def quickstart(
    minutes: Annotated[float, typer.Option(min=0.1, help="Time budget of training, in minutes (the steps that "
                                                         "fit are measured on the first steps)")] = 5.0,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Cap on training steps (default: the recipe's 100)")]
    = None,
    ppl_tokens: Annotated[int, typer.Option(min=64, help="Validation tokens the export gate scores per file")]
    = 2048,
    max_items: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N test rows")] = None,
    recipe: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="Training recipe (YAML) instead "
                                                "of the shipped smollm2-cpu; its base model, if it names none, is the "
                                                "default")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Prepare the sample, fine-tune the default model, export and verify two quantizations, and compare
    them with the base model, in a new run; then print what to do next."""
    from appliance.config import DataConfig, EvalConfig, ExportConfig, ImportConfig, TrainConfig, load_settings
    from appliance.data.sample import shipped_path
    from appliance.fields import validated

    st = store()
    started = time.monotonic()
    seconds: dict[str, float] = {}

    def stage(name: str, title: str, job_dir: Path, cfg: BaseModel, result: type[R]) -> R:
        """Run one stage as a job (a run's stages keep their settings in its run.yaml)."""
        if not as_json:
            console.rule(f"[b]{title}")
        begun = time.monotonic()
        done = follow_job(name, job_dir, cfg, result, quiet=as_json)
        seconds[name] = round(time.monotonic() - begun, 1)
        return done

    default = st.catalog_entry("default")
    recipe_file = recipe or RECIPE
    settings = load_settings(recipe_file)  # read and checked before anything runs
    settings.update(max_minutes=minutes, store=str(st.root), **({"max_steps": max_steps} if max_steps else {}))
    if recipe is None or not settings.get("base_model"):
        settings["base_model"] = default.name if default is not None else None
    train_cfg = validated(TrainConfig, settings, settings.origins)
    base = train_cfg.base_model
    if default is not None and base == default.name and not st.has_model(base):
        stage("import", f"Importing the default model {default.name}", st.new_job_dir("import"),
              ImportConfig(source="default", store=str(st.root)), ImportResult)

    run = st.new_run()
    data_cfg = DataConfig(inputs=[str(shipped_path())], task="classification", text_field="text",
                          label_field="category", on_error="skip", model=base, store=str(st.root))
    data = stage("data", f"1/4 Preparing the sample into {run.id} (PII redacted, deduplicated, split)", run.path,
                 data_cfg, DataResult)
    report = run.require_data_report()
    if not as_json:
        print_data_summary(run.id, report, run.data_dir)

    train = stage("train", f"2/4 Fine-tuning {base} (recipe {recipe_file.stem}, at most {minutes:g} min)", run.path,
                  train_cfg, TrainResult)
    if not as_json:
        eval_text = f", validation loss {train.eval_loss:.4f}" if train.eval_loss is not None else ""
        console.print(f"Trained {train.steps} steps ({train.backend}, {train.method}) in "
                      f"{train.train_seconds:.0f} s: train loss {train.train_loss:.4f}{eval_text}")

    export = stage("export", "3/4 Merging, converting and quantizing, through the verification gate", run.path,
                   ExportConfig(quants=QUANTS, ppl_tokens=ppl_tokens, store=str(st.root)), ExportResult)
    if not as_json:
        for f in export.files:
            state = "[green]verified[/]" if f.passed else "[red]rejected by the gate[/]"
            agreement = f", greedy agreement {f.agreement:.0%}" if f.agreement is not None else ""
            console.print(f"{f.quant}: {state}, {f.bytes / 2**20:,.0f} MiB{agreement}")

    evaluation = stage("eval", "4/4 Evaluating base, few-shot, tuned and every exported file on the test rows",
                       run.path, EvalConfig(targets=["base", "fewshot", "tuned", "gguf"], max_items=max_items,
                                            store=str(st.root)), EvalResult)
    seconds["total"] = round(time.monotonic() - started, 1)
    summary = _summary(run.id, run.path, data, report, train, export, evaluation, seconds)
    if as_json:
        print_json(summary)
    else:
        _print_summary(train, export, evaluation, seconds, summary["next"])


def _summary(run: str, run_dir: Path, data: DataResult, report: DataReport, train: TrainResult, export: ExportResult,
             evaluation: EvalResult, seconds: dict[str, float]) -> dict[str, Any]:
    scores = {t.target: t.score.point for t in evaluation.targets}
    return {
        "run": run,
        "run_dir": str(run_dir),
        "data": {"counts": data.counts.model_dump(), "pii": data.pii, "masked_samples": report.pii.masked_samples},
        "train": train.model_dump(include={"steps", "backend", "method", "train_loss", "eval_loss", "real_tokens",
                                           "train_seconds", "peak_mem_mb"}),
        "export": {"name": export.name, "gguf_dir": export.gguf_dir, "rejected": export.rejected,
                   "files": [{"quant": f.quant, "file": f.file, "passed": f.passed, "size_bytes": f.bytes,
                              "agreement": f.agreement, "ppl_delta": f.ppl_delta} for f in export.files],
                   "modelfile": export.modelfile, "manifest": export.manifest},
        "eval": {"task": evaluation.task, "split": evaluation.split, "n": evaluation.n, "primary": evaluation.primary,
                 "targets": [t.model_dump(mode="json", include={"target", "score", "macro_f1", "size_bytes",
                                                                "tokens_per_s"}) for t in evaluation.targets],
                 "comparisons": [c.sentence for c in evaluation.comparisons],
                 "recommendation": evaluation.recommendation.model_dump(mode="json")
                 if evaluation.recommendation else None},
        "tuned_ahead_of_base": scores.get("tuned", 0.0) > scores.get("base", 0.0),
        "next": [f"appliance chat {run}", f"appliance serve {run}", "appliance tui", f"appliance verify {run}"],
        "seconds": seconds,
    }


def _print_summary(train: TrainResult, export: ExportResult, evaluation: EvalResult, seconds: dict[str, float],
                   next_steps: list[str]) -> None:
    console.rule("[b]Summary")
    table = Table(title=f"{evaluation.task} on {evaluation.n} held-out {evaluation.split} rows: "
                  f"{evaluation.primary} and macro F1 with 95% intervals")
    for column in ("model", evaluation.primary, "macro F1", "size", "tokens/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for t in evaluation.targets:
        size = f"{t.size_bytes / 2**20:,.0f} MiB" if t.size_bytes else ""
        table.add_row(t.target, interval(t.score), interval(t.macro_f1) if t.macro_f1 else "", size,
                      f"{t.tokens_per_s:,.0f}")
    console.print(table)
    for comparison in evaluation.comparisons:
        console.print(f"  {comparison.sentence}")
    if evaluation.recommendation:
        console.print(f"[green]Recommended:[/] {evaluation.recommendation.file}: {evaluation.recommendation.reason}")
    if export.rejected:
        err_console.print(f"[yellow]The verification gate rejected {', '.join(export.rejected)}[/] (kept aside "
                          f"with its report, not shipped).")
    console.print(f"Trained {train.steps} steps ({train.backend}, {train.method}) in {train.train_seconds:.0f} s; "
                  f"the whole quickstart took {seconds['total'] / 60:.1f} min "
                  f"({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items() if k != 'total')}).")
    console.print(f"Files: {export.gguf_dir} (GGUF, Modelfile, README), signed manifest {export.manifest}",
                  soft_wrap=True)
    console.print("Next:")
    for command in next_steps:
        console.print(f"  {command}", soft_wrap=True)
