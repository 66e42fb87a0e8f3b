"""Benchmark: `appliance quickstart` as a newcomer runs it, on this machine.

    .venv/bin/python bench/quickstart.py [--minutes 5] [--json]

A scratch store borrows the default model (SmolLM2-135M-Instruct, a link, not a copy) and runs
`appliance quickstart --json` with its defaults in its own process: the shipped sample prepared,
the default model fine-tuned within the time budget, Q8_0 and Q4_K_M exported through the gate,
and every target evaluated on the same held-out rows. The peers are in the same run: the base
model zero-shot, and the base model with few-shot examples (what one gets without fine-tuning).
Prints the time of each stage and the comparison table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def measure(minutes: float) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from appliance.store import Store

    default = Store.open()
    entry = default.catalog_entry("default")
    assert entry is not None and default.has_model(entry.name), "import the default model first (./install.sh)"
    with tempfile.TemporaryDirectory(prefix="bench-quickstart-") as name:
        store = Path(name) / "store"
        (store / "base").mkdir(parents=True)
        os.symlink(default.model_dir(entry.name), store / "base" / entry.name)
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "appliance", "quickstart", "--minutes", str(minutes), "--json"],
                              capture_output=True, text=True, env={**os.environ, "APPLIANCE_HOME": str(store)},
                              cwd=ROOT, check=False)
        if done.returncode != 0:
            raise SystemExit(f"quickstart failed:\n{done.stderr[-3000:]}")
        summary: dict[str, Any] = json.loads(done.stdout)
        summary["wall_seconds"] = round(time.monotonic() - started, 1)
    return summary


def report(summary: dict[str, Any], minutes: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    evaluation = summary["eval"]
    train = summary["train"]
    seconds = summary["seconds"]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total")
    console.print(f"quickstart on {os.cpu_count()} cores: {summary['wall_seconds'] / 60:.1f} min in all ({stages}); "
                  f"{train['steps']} training steps ({train['backend']}, {train['method']}) in a "
                  f"{minutes:g}-minute budget")
    table = Table(title=f"{evaluation['task']} on {evaluation['n']} held-out {evaluation['split']} rows "
                        f"(95% intervals)")
    for column in ("model", evaluation["primary"], "macro F1", "size MiB", "tokens/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for t in evaluation["targets"]:
        score, f1 = t["score"], t.get("macro_f1")
        table.add_row(t["target"], f"{score['point'] * 100:.1f} [{score['low'] * 100:.1f}, {score['high'] * 100:.1f}]",
                      f"{f1['point'] * 100:.1f}" if f1 else "", f"{(t['size_bytes'] or 0) / 2**20:,.0f}",
                      f"{t['tokens_per_s'] or 0:.0f}")
    console.print(table)
    for sentence in evaluation["comparisons"]:
        if "base" in sentence:
            console.print(f"  {sentence}")
    rejected = summary["export"]["rejected"]
    console.print(f"export: {', '.join(f['quant'] for f in summary['export']['files'] if f['passed'])} verified"
                  + (f"; rejected by the gate: {', '.join(rejected)}" if rejected else ""))
    console.print(f"reproduce: .venv/bin/python bench/quickstart.py --minutes {minutes:g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="training time budget (quickstart's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    summary = measure(args.minutes)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        report(summary, args.minutes)


if __name__ == "__main__":
    main()
