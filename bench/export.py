"""Benchmark: the export stage (merge, convert, quantize, verify) against the bare path without a gate.

    .venv/bin/python bench/export.py [--quant Q8_0,Q6_K,Q4_K_M,Q4_0] [--steps 8] [--json]

A scratch store borrows the default model (SmolLM2-135M-Instruct, a link, not a copy), prepares the
shipped helpdesk sample and trains a LoRA adapter briefly (rank 8, 8 steps). Then, on that one
adapter, each in its own process:
- ours: `appliance export --run RUN --quant ... --json`: merge, F16 GGUF with the version-locked
  converter, quantize, then the verification gate (greedy agreement, perplexity vs F16);
- bare: what other tools do: peft `merge_and_unload()` + `save_pretrained` in bf16, the same
  converter to F16, the same quantizer for each quant, and no verification at all.
The gap between the two totals is what the gate (and our merge checks) cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
RECIPE = "max_steps: {steps}\nbatch_size: 4\nmax_seq_len: 192\nlearning_rate: 5.0e-4\nrank: 8\nalpha: 16\n"


def bare(run_dir: Path, base_dir: Path, out: Path, quants: list[str]) -> None:
    """The peer: merge, convert, quantize, timing each step; printed as a JSON line."""
    from appliance import offline

    offline.activate()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appliance import toolchain

    steps: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).merge_and_unload()
    model.save_pretrained(str(out / "merged"), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(run_dir / "adapter")).save_pretrained(str(out / "merged"))
    steps["merge"] = {"seconds": time.perf_counter() - started}
    f16 = out / "model-F16.gguf"
    began = time.perf_counter()
    toolchain.convert_to_gguf(out / "merged", f16, "f16")
    steps["F16"] = {"seconds": time.perf_counter() - began, "bytes": f16.stat().st_size}
    for quant in quants:
        target = out / f"model-{quant}.gguf"
        began = time.perf_counter()
        toolchain.quantize(f16, target, quant)
        steps[quant] = {"seconds": time.perf_counter() - began, "bytes": target.stat().st_size}
    print(json.dumps({"steps": steps, "seconds": time.perf_counter() - started}))


def _cli(env: dict[str, str], *args: str) -> Any:
    """`python -m appliance ARGS --json` in its own process; its JSON, and the wall seconds it took."""
    began = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "appliance", *args, "--json"], capture_output=True, text=True,
                         env=env, cwd=REPO, check=False)
    try:  # `export` exits 1 after printing its result when the gate rejected a file
        result = json.loads(out.stdout)
    except ValueError:
        result = None
    if out.returncode != 0 and not (isinstance(result, dict) and result.get("rejected")):
        sys.exit(f"appliance {' '.join(args)} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return result, time.perf_counter() - began


def _machine() -> str:
    cpu = platform.processor()
    if not cpu and Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else ""
    from appliance.hardware import memory

    return f"{os.cpu_count()} CPUs ({cpu or platform.machine()}), {memory().total_mb / 1024:.0f} GiB RAM"


def measure(args: argparse.Namespace, quants: list[str]) -> dict[str, Any]:
    from appliance.data.sample import shipped_path
    from appliance.store import Store

    default = Store.open()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        store = Store.open(Path(tmp) / "store")
        os.symlink(default.model_dir(MODEL), store.model_dir(MODEL))
        env = {**os.environ, "APPLIANCE_HOME": str(store.root)}
        prepared, _ = _cli(env, "data", "prepare", str(shipped_path()), "--task", "classification",
                           "--label-field", "category", "--no-near-dup")
        run = prepared["run"]
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(RECIPE.format(steps=args.steps), encoding="utf-8")
        print(f"... training {run} for {args.steps} steps", file=sys.stderr)
        trained, _ = _cli(env, "train", "--run", run, "--recipe", str(recipe))
        print(f"... ours: appliance export --quant {','.join(quants)}", file=sys.stderr)
        ours, ours_wall = _cli(env, "export", "--run", run, "--quant", ",".join(quants))
        if ours.get("rejected_dir"):  # why the gate refused a file; the report goes with the temp dir

            report = store.run(run).verification(Path(ours["rejected_dir"]))
            ours["rejected_why"] = {f.quant: "; ".join(f"{c.name}: {c.detail}" for c in f.checks
                                                       if c.status == "fail") for f in (report.files if report else [])}
        print("... bare: peft merge_and_unload + convert + quantize", file=sys.stderr)
        out = Path(tmp) / "bare"
        out.mkdir()
        began = time.perf_counter()
        peer = subprocess.run([sys.executable, __file__, "--child", str(store.run(run).path),
                               str(store.model_dir(MODEL)), str(out), ",".join(quants)],
                              capture_output=True, text=True, cwd=REPO, check=False)
        if peer.returncode != 0:
            sys.exit(f"the bare path failed:\n{peer.stderr[-3000:]}")
        theirs = json.loads(peer.stdout.strip().splitlines()[-1])
        theirs["wall_seconds"] = time.perf_counter() - began
    return {"machine": _machine(), "train": {"steps": trained.get("steps"), "loss": trained.get("train_loss")},
            "ours": {**ours, "wall_seconds": ours_wall}, "bare": theirs}


def rows(result: dict[str, Any]) -> list[list[str]]:
    def num(value: float | None, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    ours, theirs = result["ours"], result["bare"]["steps"]
    merged = ours["merged"]
    table = [["merge", num(merged["seconds"], ".1f"), num(theirs["merge"]["seconds"], ".1f"), "", "", "", "", ""]]
    for f in ours["files"]:
        step = "convert F16" if f["quant"] in ("F16", "BF16") else f"quantize {f['quant']}"
        step += "" if f["passed"] else " (REJECTED)"
        peer = theirs.get(f["quant"], {})
        table.append([step, num(f["seconds"], ".1f"), num(peer.get("seconds"), ".1f"), num(f["bytes"] / 2**20, ".1f"),
                      num(f["predicted_bytes"] and f["predicted_bytes"] / 2**20, ".1f"), num(f["agreement"], ".1%"),
                      num(f["ppl"], ".3f"), num(f["ppl_delta"], "+.2%")])
    table.append(["verification gate", num(ours["verify_seconds"], ".1f"), "none", "", "", "", "", ""])
    table.append(["total (in process)", num(ours["seconds"], ".1f"), num(result["bare"]["seconds"], ".1f"),
                  "", "", "", "", ""])
    table.append(["total (wall, with startup)", num(ours["wall_seconds"], ".1f"),
                  num(result["bare"]["wall_seconds"], ".1f"), "", "", "", "", ""])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quant", default="Q8_0,Q6_K,Q4_K_M,Q4_0", help="quantizations beside F16, comma-separated")
    parser.add_argument("--steps", type=int, default=8, help="training steps of the adapter that is exported")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON instead of a table")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    quants = [q.strip().upper() for q in args.quant.split(",") if q.strip()]
    if args.child:
        run_dir, base_dir, out, names = args.child
        bare(Path(run_dir), Path(base_dir), Path(out), names.split(","))
        return
    result = measure(args, quants)
    result["command"] = shlex.join([".venv/bin/python", "bench/export.py", *sys.argv[1:]])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        show(result)


def show(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    ours, theirs = result["ours"]["seconds"], result["bare"]["seconds"]
    table = Table(title=f"Export of a LoRA (r=8, {result['train']['steps']} steps) on {MODEL}: ours vs bare",
                  caption="bare: peft merge_and_unload + save_pretrained (bf16), convert, quantize; no verification")
    for i, column in enumerate(("step", "ours s", "bare s", "size MiB", "predicted MiB", "agreement", "ppl",
                                "Δppl vs F16")):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows(result):
        table.add_row(*row)
    console = Console(width=max(120, Console().width))
    console.print(table)
    console.print(f"gate cost: ours {ours:.1f} s vs bare {theirs:.1f} s in process ({ours - theirs:+.1f} s, "
                  f"{ours / theirs:.2f}x), of which verification {result['ours']['verify_seconds']:.1f} s")
    sizes = {f["quant"]: (f["bytes"], result["bare"]["steps"].get(f["quant"], {}).get("bytes"))
             for f in result["ours"]["files"]}
    differ = [f"{q} {a / 2**20:.1f} vs {b / 2**20:.1f} MiB" for q, (a, b) in sizes.items() if b and a != b]
    console.print(f"bare file sizes: {'; '.join(differ) if differ else 'identical to ours'}")
    for quant, why in result["ours"].get("rejected_why", {}).items():
        console.print(f"the gate rejected {quant} (the bare path ships it): {why}")
    console.print(f"machine: {result['machine']}")
    console.print(f"reproduce: {result['command']}")


if __name__ == "__main__":
    main()
