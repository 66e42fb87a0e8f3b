"""`appliance eval`: base, few-shot, fine-tuned and every exported quantization, side by side."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from appliance.cli import JsonOpt, app, console, follow_job, print_json, store, validated


def _interval(score: dict[str, Any]) -> str:
    return f"{score['point'] * 100:.1f}  [{score['low'] * 100:.1f}, {score['high'] * 100:.1f}]"


@app.command("eval")
def evaluate(
    run: Annotated[str, typer.Option(help="Run to evaluate")],
    targets: Annotated[str | None, typer.Option(help="Comma-separated: base, fewshot, tuned, merged, gguf (every "
                                                "exported file) or gguf:QUANT; default base,fewshot,tuned,gguf")]
    = None,
    split: Annotated[str, typer.Option(help="test or val")] = "test",
    max_items: Annotated[int | None, typer.Option(help="Evaluate only the first N items")] = None,
    fewshot_k: Annotated[int, typer.Option(help="Examples in each few-shot prompt")] = 3,
    fewshot_select: Annotated[str, typer.Option(help="similar or random")] = "similar",
    tolerance: Annotated[float, typer.Option(help="Points a quantization may lose and still be recommended")]
    = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Score every target on the run's test split with the same prompts, with 95% intervals, and recommend
    the smallest quantization that keeps the fine-tuned model's quality."""
    from appliance.config import EvalConfig

    st = store()
    run_dir = st.run_dir(run)
    settings: dict[str, Any] = {"split": split, "max_items": max_items, "fewshot_k": fewshot_k,
                                "fewshot_select": fewshot_select, "tolerance": tolerance, "store": str(st.root)}
    if targets:
        settings["targets"] = [t.strip() for t in targets.split(",") if t.strip()]
    cfg = validated(EvalConfig, **settings)
    result = follow_job("eval", run_dir, cfg, quiet=as_json).result
    if as_json:
        print_json(result)
        return
    table = Table(title=f"Run {result['run']}: {result['task']} on {result['n']} {result['split']} items, "
                  f"{result['primary']} (95% interval)")
    with_f1 = result["task"] == "classification"
    for column in ("target", result["primary"], *(["macro F1"] if with_f1 else []), "size", "tokens/s", "seconds"):
        table.add_column(column)
    for row in result["targets"]:
        size = f"{row['size_bytes'] / 2**20:,.0f} MiB" if row["size_bytes"] else ""
        f1 = [_interval(row["macro_f1"])] if with_f1 and row.get("macro_f1") else []
        table.add_row(row["target"], _interval(row["score"]), *f1, size, f"{row['tokens_per_s']:.0f}",
                      str(row["seconds"]))
    console.print(table)
    for comparison in result["comparisons"]:
        console.print(f"  {comparison['sentence']}")
    recommendation = result["recommendation"]
    if recommendation:
        console.print(f"[green]Recommended:[/] {recommendation['file']} ({recommendation['size_bytes'] / 2**20:,.0f} "
                      f"MiB, {recommendation['tokens_per_s']:.0f} tokens/s here): {recommendation['reason']}")
    elif result["note"]:
        console.print(f"[dim]{result['note']}[/]")
