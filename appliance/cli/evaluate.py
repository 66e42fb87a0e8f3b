"""`appliance eval`: base, few-shot, fine-tuned and every exported quantization, side by side."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from appliance.cli import JsonOpt, app, console, follow_job, print_json, store
from appliance.cli.options import Settings, config_options
from appliance.config import EvalConfig
from appliance.fields import validated
from appliance.records import EvalResult, Interval


def interval(score: Interval) -> str:
    return f"{score.point * 100:.1f}  [{score.low * 100:.1f}, {score.high * 100:.1f}]"


@app.command("eval")
@config_options(EvalConfig)
def evaluate(
    settings: Settings,
    run: Annotated[str, typer.Option(help="Run to evaluate")],
    as_json: JsonOpt = False,
) -> None:
    """Score every target on the run's test split with the same prompts, with 95% intervals, and recommend
    the smallest quantization that keeps the fine-tuned model's quality."""
    st = store()
    target = st.run(run)
    cfg = validated(EvalConfig, {**settings, "store": str(st.root)})
    result = follow_job("eval", target.path, cfg, EvalResult, quiet=as_json)
    if as_json:
        print_json(result.model_dump(mode="json"))
        return
    table = Table(title=f"Run {result.run}: {result.task} on {result.n} {result.split} items, "
                  f"{result.primary} (95% interval)")
    with_f1 = result.task == "classification"
    for column in ("target", result.primary, *(["macro F1"] if with_f1 else []), "size", "tokens/s", "seconds"):
        table.add_column(column)
    for row in result.targets:
        size = f"{row.size_bytes / 2**20:,.0f} MiB" if row.size_bytes else ""
        f1 = [interval(row.macro_f1)] if with_f1 and row.macro_f1 else []
        table.add_row(row.target, interval(row.score), *f1, size, f"{row.tokens_per_s:.0f}", str(row.seconds))
    console.print(table)
    for comparison in result.comparisons:
        console.print(f"  {comparison.sentence}")
    recommendation = result.recommendation
    if recommendation:
        console.print(f"[green]Recommended:[/] {recommendation.file} ({recommendation.size_bytes / 2**20:,.0f} "
                      f"MiB, {recommendation.tokens_per_s:.0f} tokens/s here): {recommendation.reason}")
    elif result.note:
        console.print(f"[dim]{result.note}[/]")
