"""Benchmark: time from launch to first paint of the TUI, next to Textual's own minimal app.

    .venv/bin/python bench/tui_startup.py [--runs 7] [--json]

Each launch is a fresh `python` process (cold imports, as a user's would be) that runs the app
headless at 120x40 and reports, from inside the app's first ready callback (the first screen has
been composed and painted), how long it has been since the process was spawned. Our app opens
Home on the real store (the runs table filled; the machine check runs in a thread and does not
hold up the paint). The peer is a Textual app with one Static and a Footer. Median of --runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

OURS = """
import os, sys, time
from tui.app import build_app
app = build_app(doctor=lambda: {"ok": True, "checks": []})
async def ready(pilot):
    print("PAINT", time.time() - float(os.environ["SPAWNED"]), flush=True)
    pilot.app.exit()
app.run(headless=True, size=(120, 40), auto_pilot=ready)
"""

PEER = """
import os, sys, time
from textual.app import App
from textual.widgets import Footer, Static
class Minimal(App):
    def compose(self):
        yield Static("hello")
        yield Footer()
async def ready(pilot):
    print("PAINT", time.time() - float(os.environ["SPAWNED"]), flush=True)
    pilot.app.exit()
Minimal().run(headless=True, size=(120, 40), auto_pilot=ready)
"""


def _once(code: str) -> float:
    env = {**os.environ, "SPAWNED": repr(time.time())}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120, check=True).stdout
    return float(next(line for line in out.splitlines() if line.startswith("PAINT")).split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="Launches of each app (at most 50)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = min(50, max(1, args.runs))
    times: dict[str, list[float]] = {"appliance tui (Home)": [], "textual minimal app": []}
    for _ in range(runs):  # interleaved, so drift of the machine touches both alike
        times["appliance tui (Home)"].append(_once(OURS))
        times["textual minimal app"].append(_once(PEER))
    rows = {name: {"median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3), "max_s": round(max(t), 3)}
            for name, t in times.items()}
    if args.json:
        print(json.dumps({"runs": runs, "results": rows}, indent=2))
        return
    print(f"launch to first paint, headless 120x40, {runs} cold launches each, {os.cpu_count()} cores")
    print(f"{'app':<24}{'median s':>10}{'min s':>8}{'max s':>8}")
    for name, row in rows.items():
        print(f"{name:<24}{row['median_s']:>10.3f}{row['min_s']:>8.3f}{row['max_s']:>8.3f}")
    ours, peer = (rows[n]["median_s"] for n in times)
    print(f"ours takes {ours - peer:+.3f} s ({ours / peer:.2f}x) against Textual's minimal app")


if __name__ == "__main__":
    main()
