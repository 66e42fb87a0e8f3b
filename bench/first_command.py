"""Benchmark: the README's first command on a fresh clone, timed end to end.

    .venv/bin/python bench/first_command.py [--keep-wheel-cache]

Clones this checkout's HEAD into a temporary folder and runs exactly what a newcomer runs there,
`./install.sh && .venv/bin/appliance quickstart`: a new virtual environment, the pinned packages
from the configured index, the llama.cpp runtime (built from source unless --keep-wheel-cache:
the cached wheel is moved aside for the run and put back after), the default model imported into
the clone's own store, then the quickstart with its defaults. The goal it is held to: under 20
minutes on a 2-core machine. Prints the time of each part and the quickstart's summary line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = Path.home() / ".cache" / "appliance" / "wheels"
GOAL_MIN = 20.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-wheel-cache", action="store_true", help="reuse a cached llama.cpp wheel")
    args = parser.parse_args()
    aside = WHEELS.with_name("wheels.aside-bench")
    moved = not args.keep_wheel_cache and WHEELS.is_dir()
    if moved:
        WHEELS.rename(aside)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-first-") as name:
            clone = Path(name) / "appliance"
            subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
            env = {k: v for k, v in os.environ.items() if k not in ("APPLIANCE_HOME", "VIRTUAL_ENV")}
            env["COLUMNS"] = "120"
            started = time.monotonic()
            install = subprocess.run(["./install.sh"], cwd=clone, env=env, capture_output=True, text=True, check=False)
            installed = time.monotonic()
            if install.returncode != 0:
                raise SystemExit(f"install.sh failed:\n{(install.stdout + install.stderr)[-3000:]}")
            quick = subprocess.run([str(clone / ".venv" / "bin" / "appliance"), "quickstart"], cwd=clone, env=env,
                                   capture_output=True, text=True, check=False)
            finished = time.monotonic()
            if quick.returncode != 0:
                raise SystemExit(f"quickstart failed:\n{(quick.stdout + quick.stderr)[-3000:]}")
    finally:
        if moved:
            if WHEELS.exists():  # the run built a fresh one: keep the one that was there
                shutil.rmtree(WHEELS)
            aside.rename(WHEELS)
    total = (finished - started) / 60
    lines = quick.stdout.splitlines()
    trained = next((line for line in lines if line.startswith("Trained ")), "")
    tuned = [line for line in lines if line.startswith(("│ base ", "│ fewshot ", "│ tuned ", "│ gguf:"))]
    cache = "reused" if args.keep_wheel_cache else "built from source"
    print(f"fresh clone, {os.cpu_count()} cores, llama.cpp wheel {cache}")
    print(f"{'part':<34} {'minutes':>8}")
    print(f"{'./install.sh':<34} {(installed - started) / 60:>8.1f}")
    print(f"{'.venv/bin/appliance quickstart':<34} {(finished - installed) / 60:>8.1f}")
    print(f"{'total':<34} {total:>8.1f}   goal: under {GOAL_MIN:g} ({'met' if total < GOAL_MIN else 'MISSED'})")
    print(trained)
    print("\n".join(tuned))
    print("reproduce: .venv/bin/python bench/first_command.py")
    sys.exit(0 if total < GOAL_MIN else 1)


if __name__ == "__main__":
    main()
