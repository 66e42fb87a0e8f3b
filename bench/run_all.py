"""Run every benchmark under bench/ that this machine can run and write BENCHMARKS.md.

    .venv/bin/python bench/run_all.py [--only NAME,...] [--out BENCHMARKS.md] [--timeout 3600]
    .venv/bin/python bench/run_all.py --from-file gpu_check=PATH    (a table that came back from a GPU machine)

Each benchmark runs in its own process, one after the other (never two at once, so they do not
share the cores), with its default settings. GPU benchmarks are skipped without a CUDA GPU and say
so. BENCHMARKS.md gets, for each: what it measures, the peer it is compared with, the command that
reproduces it, how long it took, and the table it printed; at the top, the machine they ran on.
A benchmark that fails is reported with the end of its output, and the others still run.
`--from-file NAME=PATH` records the table a benchmark wrote elsewhere (bench/gpu/check.sh on a lent GPU
machine writes check.out.txt) as that benchmark's section, without running it; the other sections stay.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    title: str
    peer: str
    gpu: bool = False
    command: str = ""  # how to reproduce it, when not `.venv/bin/python SCRIPT`


BENCHES = [
    Bench("data_prep", "bench/data_prep.py", "Data preparation: rows per second and peak memory",
          "the same per-row work after loading the file with pandas"),
    Bench("pii", "bench/pii.py", "PII detection: precision and recall per type on the labelled set",
          "spaCy's en_core_web_sm alone, and Presidio's analyzer over it when installed"),
    Bench("train_throughput", "bench/train_throughput.py", "Training: real tokens per second and peak memory",
          "TRL's SFTTrainer with its defaults"),
    Bench("export", "bench/export.py", "Export: merge, convert, quantize and verify",
          "the bare path: peft merge_and_unload, the same converter and quantizer, no checks"),
    Bench("job_start", "bench/job_start.py", "Job start: GGUF header, a job's imports, GGUF import",
          "gguf's GGUFReader, a plain import, transformers' GGUF loader as called"),
    Bench("eval_speed", "bench/eval_speed.py", "Evaluation: items per second",
          "naive full-forward scoring, transformers generate, llama-cpp-python create_completion"),
    Bench("serve_load", "bench/serve_load.py", "Serving under concurrent load",
          "bare llama-cpp-python server on the same GGUF"),
    Bench("tui_startup", "bench/tui_startup.py", "Terminal UI: launch to first paint", "Textual's own minimal app"),
    Bench("first_command", "bench/first_command.py", "The README's first command on a fresh clone",
          "the goal: install and quickstart in under 20 minutes on 2 cores"),
    Bench("quickstart", "bench/quickstart.py", "Quickstart: the whole pipeline on the sample",
          "the base model zero-shot and few-shot, in the same run"),
    Bench("fuzz_readers", "bench/fuzz_readers.py", "Fuzzing the data readers and the recipe loader (atheris)",
          "no peer (a robustness check: the goal is zero crashes)"),
    Bench("chaos", "bench/chaos.py", "Chaos: SIGKILL at random points of data preparation, training and export, "
          "then resume or re-run", "no peer (the goal: every round survived with nothing lost)"),
    Bench("scale", "bench/scale.py", "The pipeline at real size: every stage of an 8B-shaped model on this machine",
          "peft's merge_and_unload where its bf16 copy fits; the planner's prediction and the machine's RAM"),
    Bench("merge", "bench/merge.py", "Merge: streamed, tensor by tensor, against peft's merge_and_unload",
          "peft's merge_and_unload on the base loaded in bf16, then save_pretrained (what other tools do)"),
    Bench("qlora_compare", "bench/gpu/qlora_compare.py", "QLoRA on CUDA", "plain transformers + peft + bitsandbytes",
          gpu=True),
    Bench("gpu_check", "bench/gpu/check.py", "GPU check: import, QLoRA (Unsloth and hf), kill -9 and resume, planner "
          "vs peak VRAM, merge on the GPU, export and gate, decode on the GPU vs the CPU",
          "plain transformers + peft + bitsandbytes QLoRA on the same batches; llama.cpp with no layers offloaded",
          gpu=True, command="`bash bench/gpu/prepare_wheels.sh` here, then `bash bench/gpu/check.sh` on the GPU "
          "machine"),
]


def has_gpu() -> bool:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def machine() -> str:
    cores = os.cpu_count() or 0
    memory = model = ""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
        memory = f", {kb / 2**20:.0f} GiB RAM"
    with contextlib.suppress(OSError, StopIteration):
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    gpu = "a CUDA GPU" if has_gpu() else "no GPU"
    return f"{platform.system()} {platform.machine()}, {model or 'CPU'} ({cores} cores){memory}, {gpu}, " \
           f"Python {platform.python_version()}"


def run(bench: Bench, timeout: float) -> tuple[str, str, float]:
    """(status, output, seconds); status is ok, failed or timed out."""
    started = time.monotonic()
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"}
    try:
        done = subprocess.run([sys.executable, bench.script], cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return "timed out", out[-4000:], time.monotonic() - started
    seconds = time.monotonic() - started
    if done.returncode != 0:
        return "failed", (done.stdout + done.stderr)[-4000:], seconds
    return "ok", done.stdout.strip(), seconds


def _from_files(pairs: list[str]) -> dict[str, Path]:
    """NAME=PATH pairs of --from-file, checked: a known benchmark and a file that exists."""
    known = {bench.name for bench in BENCHES}
    found = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        if name not in known or not path:
            raise SystemExit(f"--from-file {pair!r}: expected NAME=PATH with NAME one of {', '.join(sorted(known))}")
        if not Path(path).is_file():
            raise SystemExit(f"--from-file {pair!r}: no file at {path}")
        found[name] = Path(path)
    return found


def _sections(path: Path) -> dict[str, str]:
    """The sections of an earlier BENCHMARKS.md, by title."""
    if not path.is_file():
        return {}
    parts = path.read_text(encoding="utf-8").split("\n## ")[1:]
    return {part.split("\n", 1)[0]: "## " + part.rstrip("\n") + "\n" for part in parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated benchmark names")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds each benchmark may take")
    parser.add_argument("--from-file", action="append", default=[], metavar="NAME=PATH",
                        help="record the table in PATH as benchmark NAME's section instead of running it")
    args = parser.parse_args()
    given = _from_files(args.from_file)
    wanted = set(args.only.split(",")) | set(given) if args.only else (set(given) or None)
    gpu = has_gpu()
    kept = _sections(args.out)  # benchmarks not run this time keep their last section
    sections = []
    for bench in BENCHES:
        if wanted is not None and bench.name not in wanted:
            if bench.title in kept:
                sections.append(kept[bench.title])
            continue
        command = bench.command or f"`.venv/bin/python {bench.script}`"
        head = f"## {bench.title}\n\nPeer: {bench.peer}. Reproduce: {command}.\n"
        if bench.name in given:
            stamp = datetime.now(UTC).strftime("%Y-%m-%d")
            table = given[bench.name].read_text(encoding="utf-8").strip()
            sections.append(f"{head}\nRecorded on {stamp} from {given[bench.name].name}, written where it ran (the "
                            f"machine is its first line).\n\n```\n{table}\n```\n")
            continue
        if bench.gpu and not gpu:
            print(f"skip {bench.name}: needs a CUDA GPU", file=sys.stderr)
            sections.append(kept.get(bench.title) or head + "\nSkipped: this machine has no CUDA GPU.\n")
            continue
        print(f"run  {bench.name} ...", file=sys.stderr, flush=True)
        status, output, seconds = run(bench, args.timeout)
        print(f"     {bench.name}: {status} in {seconds / 60:.1f} min", file=sys.stderr, flush=True)
        minutes = f"{seconds / 60:.1f} min"
        stamp = datetime.now(UTC).strftime("%Y-%m-%d")
        note = f"\nRan in {minutes} on {stamp}." if status == "ok" else f"\n**{status}** after {minutes}."
        sections.append(f"{head}{note}\n\n```\n{output}\n```\n")
    known = {bench.title for bench in BENCHES}
    sections += [text for title, text in kept.items() if title not in known]  # a section written by hand stays
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"# Benchmarks\n\nWritten by `bench/run_all.py` on {stamp}.\n\nMachine: {machine()}.\n\n"
            "Each table compares appliance with a named peer in the same run on the same machine; the command "
            "under each heading reproduces it.\n\n" + "\n".join(sections))
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
