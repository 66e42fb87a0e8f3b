"""The pipeline at real size: import, merge, convert, quantize, gate, evaluate and serve a model of a real shape on
this machine, each stage through the appliance's own CLI, with its wall time and peak memory beside the planner's
prediction (`appliance plan`) and the machine's RAM.

    .venv/bin/python bench/scale.py [--shape smollm2-135m,llama-3.1-8b] [--work DIR] [--keep]

Shapes other than the default are random bf16 weights in the published config's shape (bench/merge.py), written a
tensor at a time; the weights' values change neither memory nor time. Each gets a random rank-16 adapter on every
linear layer in place of a training (training an 8B model on a CPU is planned, not run: `appliance plan` says what
it needs). The peer: peft's merge_and_unload on the same base and adapter (the merge the export used before it
streamed), where its bf16 copy fits this machine.

Peak memory is the sum of the resident memory of the stage's processes (the job and the converter it starts),
sampled every 0.2 s and attributed to the step the job's events say it is in; the planner predicts one process,
so the job's own imports (about 0.6 GB) are in both. The work folder must be on the store's file system (the
import then hard-links the weights): at 8B it holds the source, the merged model and the GGUFs, about 55 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge import REPO, SHAPES, default_base, measure, random_adapter, random_base
from serve_load import _port, _wait

KEY = "bench-scale-key-0123456789abcdef"
STEP_SECONDS: dict[str, float] = {}  # of the last command's steps
STEP_ANON: dict[str, float] = {}  # the peak anonymous memory of the last command's steps
STEPS = {"merging": "merge", "merged": "merge", "converting": "convert", "quantizing": "quantize",
         "verification": "gate"}


def _proportional_mb(process: Any) -> tuple[float, float]:
    """A process's resident memory with the pages it shares with others counted in proportion (PSS: the export's
    warm converter is forked from the job and shares its libraries' pages, which a sum of RSS would count twice),
    and the anonymous part of it (what is not a file's pages: the kernel cannot drop it under pressure, while the
    pages of a mapped model file that were read once, such as the GGUF tensors llama.cpp copies into its own
    interleaved layout on an AVX2 CPU, it can)."""
    found: dict[str, float] = {}
    try:
        with open(f"/proc/{process.pid}/smaps_rollup", encoding="ascii") as handle:
            for line in handle:
                key = line.split(":", 1)[0]
                if key in ("Pss", "Pss_Anon"):
                    found[key] = int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    if "Pss" not in found:
        rss = float(process.memory_info().rss) / 2**20
        return rss, rss
    return found["Pss"], found.get("Pss_Anon", found["Pss"])


class Sampler:
    """Peak resident memory of a process tree (shared pages counted in proportion), by the step its events file
    names (the last progress event)."""

    def __init__(self, root_pid: int, events: Path | None, default: str, with_root: bool = False) -> None:
        self.root, self.events, self.step, self.with_root = root_pid, events, default, with_root
        self.offset = events.stat().st_size if events is not None and events.is_file() else 0  # earlier jobs' events
        self.peaks: dict[str, float] = {}
        self.anon: dict[str, float] = {}  # the peak of the anonymous part, by step
        self.started: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _step(self) -> str:
        """The step of the last progress event, reading only what was appended since the last sample."""
        if self.events is None or not self.events.is_file():
            return self.step
        with self.events.open(encoding="utf-8") as handle:
            handle.seek(self.offset)
            for line in handle:
                if not line.endswith("\n"):
                    break  # being written: read it whole next time
                self.offset += len(line.encode("utf-8"))
                event = json.loads(line) if line.startswith("{") else {}
                if event.get("type") == "progress":
                    phase = str(event.get("phase", ""))
                    self.step = next((s for prefix, s in STEPS.items() if phase.startswith(prefix)), self.step)
        return self.step

    def _loop(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                root = psutil.Process(self.root)
                tree = root.children(recursive=True) + ([root] if self.with_root else [])  # not the CLI front end
                rss = anon = 0.0
                for process in tree:
                    try:
                        total, anonymous = _proportional_mb(process)
                    except (psutil.Error, OSError):
                        continue
                    rss, anon = rss + total, anon + anonymous
                step = self._step()
                self.started.setdefault(step, time.monotonic())
                self.peaks[step] = max(self.peaks.get(step, 0.0), rss)
                self.anon[step] = max(self.anon.get(step, 0.0), anon)
            except psutil.Error:
                pass
            self.stop.wait(0.5)  # PSS walks the page tables: of a 16 GB mapping, tens of ms a read

    def finish(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join()
        return self.peaks

    def durations(self, end: float) -> dict[str, float]:
        """Seconds of each step: from the first sample in it to the first sample of the next (or `end`)."""
        order = sorted(self.started.items(), key=lambda item: item[1])
        ends = [at for _step, at in order[1:]] + [end]
        return {step: stop - began for (step, began), stop in zip(order, ends, strict=True)}


def cli(store: Path, *args: str, events: Path | None = None, step: str = "") -> tuple[dict[str, Any], float,
                                                                                       dict[str, float]]:
    """An appliance command with --json: its result, wall time and peak memory by step (STEP_SECONDS keeps the
    seconds of each step of the last command)."""
    # each job in a process of its own, a child of the CLI, as the memory plan counts it (not forked by a job host)
    env = {**os.environ, "APPLIANCE_HOME": str(store), "TOKENIZERS_PARALLELISM": "false", "APPLIANCE_JOB_HOST": "0"}
    began = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "appliance", *args, "--json"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    sampler = Sampler(process.pid, events, step)
    out, err = process.communicate()
    peaks = sampler.finish()
    STEP_SECONDS.clear()
    STEP_SECONDS.update(sampler.durations(time.monotonic()))
    STEP_ANON.clear()
    STEP_ANON.update(sampler.anon)
    if process.returncode:
        raise SystemExit(f"appliance {' '.join(args)} failed ({process.returncode}):\n{err[-3000:]}")
    return json.loads(out), time.monotonic() - began, peaks


def serve_once(store: Path, run: str) -> tuple[float, float, float, str]:
    """Start the endpoint on the run's Q4_K_M, answer one chat request, stop: wall time, peak memory, the answer."""
    import httpx

    port = _port()
    env = {**os.environ, "APPLIANCE_HOME": str(store), "APPLIANCE_API_KEY": KEY}
    began = time.monotonic()
    log = store / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "appliance", "serve", run, "--quant", "Q4_K_M", "--port",
                                    str(port), "--free"], env=env, stdout=output, stderr=subprocess.STDOUT)
    sampler = Sampler(process.pid, None, "serve", with_root=True)
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, process, headers)  # exits with the server's code if it stops: serve.log says why
        body = {"model": run, "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": "My invoice was charged twice. What should I do?"}]}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=900).json()
        text = answer["choices"][0]["message"]["content"]
    finally:
        process.terminate()
        process.wait(timeout=120)
    peak = sampler.finish().get("serve", 0.0)
    return time.monotonic() - began, peak, sampler.anon.get("serve", 0.0), text


def _settle(weights: Path) -> None:
    """Scale the random B matrices down to the size a few training steps give them (LoRA starts B at zero): a
    random adapter at full scale turns a real model into noise, whose near-ties no quantization can keep."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    save_file({k: v * 0.05 if ".lora_B." in k else v for k, v in tensors.items()}, str(weights))


def run_shape(shape: str, work: Path, rank: int) -> dict[str, Any]:
    """Every stage of one shape; the rows of its table."""
    from appliance import pipeline_plan
    from appliance.data.sample import shipped_path

    store = work / "store"
    folder = work / shape
    source = default_base() if shape == "smollm2-135m" else folder / "source"
    timings: dict[str, Any] = {}
    if shape != "smollm2-135m" and not (source / "config.json").is_file():
        began = time.monotonic()
        random_base(shape, source)
        for file in default_base().iterdir():
            if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy2(file, source / file.name)
        print(f"{shape}: random base written in {time.monotonic() - began:.0f} s", file=sys.stderr)
    config = json.loads((source / "config.json").read_text())
    machine = pipeline_plan.Machine.here(work)
    choices = pipeline_plan.Choices(quants=["Q4_K_M"], link=shape != "smollm2-135m")
    planned = {s.stage: s for s in pipeline_plan.stages(config, choices, machine)}
    name = f"scale-{shape}"
    rows: list[dict[str, Any]] = []

    def row(stage: str, seconds: float | None, peak: float | None, note: str = "", anon: float | None = None) -> None:
        if anon is None and peak is not None:
            anon = max(STEP_ANON.values(), default=0.0) if stage not in STEP_ANON else STEP_ANON[stage]
        rows.append({"stage": stage, "seconds": seconds, "peak_mb": peak, "anon_mb": anon,
                     "planned_mb": planned[stage].ram_mb if stage in planned else None, "note": note})
        print(json.dumps({"shape": shape, **rows[-1]}), file=sys.stderr)

    imported, seconds, peaks = cli(store, "models", "import", str(source), "--name", name, step="import")
    row("import", seconds, max(peaks.values(), default=0.0), f"{imported['parameters'] / 1e9:.2f} B parameters")
    prepared, seconds, _ = cli(store, "data", "prepare", str(shipped_path()), "--task", "classification",
                               "--text-field", "text", "--label-field", "category", "--model", name, "--no-near-dup",
                               "--pii-entities", "")
    run_dir = Path(prepared["run_dir"])
    lora = random_adapter(store / "base" / name, run_dir / "adapter", rank)
    _settle(run_dir / "adapter" / "adapter_model.safetensors")
    row("train", None, None, f"not run: a random rank-{rank} adapter ({lora / 1e6:.1f} M parameters); planned on "
        f"the CPU: {pipeline_plan.gib(planned['train'].ram_mb)}")
    exported, seconds, peaks = cli(store, "export", "--run", run_dir.name, "--quant", "Q4_K_M",
                                   events=run_dir / "events.jsonl", step="merge")
    timings["export_seconds"] = seconds
    files = {f["quant"]: f for f in exported["files"]}
    for step in ("merge", "convert", "quantize", "gate"):
        note = {"merge": exported["merged"]["check"], "convert": f"F16 {files['F16']['bytes'] / 1e9:.2f} GB",
                "quantize": f"Q4_K_M {files['Q4_K_M']['bytes'] / 1e9:.2f} GB",
                "gate": exported.get("budget") or ""}[step]
        row(step, STEP_SECONDS.get(step), peaks.get(step), note)
    rows.append({"stage": "export (all four)", "seconds": seconds, "peak_mb": max(peaks.values()),
                 "anon_mb": max(STEP_ANON.values(), default=0.0), "planned_mb": None,
                 "note": f"verification {exported['verify_seconds']} s"})
    evaluated, seconds, peaks = cli(store, "eval", "--run", run_dir.name, "--targets", "gguf:Q4_K_M", "--max-items",
                                    "4", step="evaluate")
    row("evaluate", seconds, max(peaks.values(), default=0.0), "Q4_K_M on 4 test items")
    seconds, peak, anon, answer = serve_once(store, run_dir.name)
    row("serve", seconds, peak, f"one request, 16 tokens: {answer[:30]!r}", anon)
    peer: dict[str, Any] = {}
    model_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    if model_bytes * 2.2 < machine.ram_available_mb * 2**20:
        peer = measure("peft", source, run_dir / "adapter", folder / "merged-peft")
    return {"shape": shape, "parameters": imported["parameters"], "ram_mb": machine.ram_total_mb,
            "available_mb": machine.ram_available_mb, "rows": rows, "peer": peer, "evaluated": bool(evaluated)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m,llama-3.1-8b",
                        help="comma-separated: smollm2-135m, " + ", ".join(SHAPES))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--work", type=Path, default=REPO / "models" / ".bench-scale",
                        help="work folder, on the store's file system (default: models/.bench-scale)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (models, GGUFs) afterwards")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from appliance import pipeline_plan

    results = []
    try:
        for shape in args.shape.split(","):
            if shape != "smollm2-135m":  # the source it writes (as a copy would), the merged model, the GGUFs
                planned = pipeline_plan.pipeline(SHAPES[shape], shape, pipeline_plan.Choices(quants=["Q4_K_M"]),
                                                 pipeline_plan.Machine.here(args.work))
                pipeline_plan.check_disk(planned.disk_mb, args.work, f"bench/scale.py --shape {shape}", "")
            results.append(run_shape(shape, args.work / "w", args.rank))
            if not args.keep:
                shutil.rmtree(args.work / "w" / shape, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    _print(results)


def _print(results: list[dict[str, Any]]) -> None:
    first = results[0]
    print(f"The pipeline at size on {os.cpu_count()} CPUs, {first['ram_mb'] / 1024:.1f} GiB RAM "
          f"({first['available_mb'] / 1024:.1f} available), no GPU; peak = resident memory of the stage's processes "
          "(PSS: pages they share counted once)")
    for result in results:
        print(f"\n{result['shape']} ({result['parameters'] / 1e9:.2f} B parameters)")
        print(f"{'stage':<18} {'seconds':>8} {'peak GiB':>9} {'anon GiB':>9} {'planned GiB':>12}  note")
        for row in result["rows"]:
            seconds = f"{row['seconds']:.0f}" if row["seconds"] is not None else ""
            peak = f"{row['peak_mb'] / 1024:.2f}" if row["peak_mb"] else ""
            anon = f"{row['anon_mb'] / 1024:.2f}" if row.get("anon_mb") else ""
            planned = f"{row['planned_mb'] / 1024:.2f}" if row["planned_mb"] else ""
            print(f"{row['stage']:<18} {seconds:>8} {peak:>9} {anon:>9} {planned:>12}  {row['note']}")
        peer = result["peer"]
        if peer and "error" not in peer:
            print(f"{'peer: peft merge':<18} {peer['seconds']:>8.0f} {peer['peak_mb'] / 1024:>9.2f} {'':>9} {'':>12}  "
                  "merge_and_unload in bf16 (the merge before it streamed)")
        else:
            print(f"{'peer: peft merge':<18} {'':>8} {'':>9} {'':>9} {'':>12}  not run: its bf16 copy does not fit "
                  "this machine's memory twice")
    print("\npeak: the stage's processes' resident memory, pages they share counted once (PSS); anon: the part that is "
          "not a file's pages.\nThe rest of a llama.cpp stage's peak is the GGUF's mapped pages: on an AVX2 CPU "
          "llama.cpp copies the\nquantized weights it can into its own interleaved layout and leaves the pages it "
          "read mapped, which the kernel\ndrops under memory pressure. The planner counts the weights once, the "
          "cache, the compute buffers and the runtime.")


if __name__ == "__main__":
    main()
