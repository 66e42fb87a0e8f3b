"""Parts of bench/gpu/check.py: reading a run's files, sampling nvidia-smi, the machine line, and the helpers
that run in a process of their own (so the check's own process never holds the GPU):

    python bench/gpu/check_parts.py make-model FOLDER TOKENIZER_DIR gpu|cpu
    python bench/gpu/check_parts.py decode GGUF N_GPU_LAYERS
    python bench/gpu/check_parts.py batches MODEL_DIR TRAIN_JSONL STEPS MAX_SEQ_LEN OUT_JSON
    python bench/gpu/check_parts.py llama-state

Each prints one JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# Llama-3.2-1B's published shapes (bench/gpu/qlora_compare.py's CONFIG) with the default tokenizer's vocabulary,
# so the converter and the gate see a tokenizer that covers the embedding (as bench/gpu/distributed.py does).
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": True}
# The dry run's: tests/conftest.py's tiny Llama (2 layers, hidden 64).
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": True}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
DECODE_TOKENS = 64
PROMPT = "The printer on the third floor has been jammed since Monday and"


class StepFailed(Exception):
    """A step did not do what it should: the row says FAILED with this message."""


# -- reading a run ---------------------------------------------------------------------------------


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def events(run_dir: Path) -> list[dict[str, Any]]:
    found = []
    for line in (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a killed writer
    return found


def metric(run_dir: Path, name: str) -> float | None:
    """The last value of a metric the run's jobs emitted."""
    values = [e["value"] for e in events(run_dir) if e.get("type") == "metric" and e.get("name") == name]
    return float(values[-1]) if values else None


def trainer_state(run_dir: Path) -> dict[str, Any]:
    """The trainer state of the run's latest complete checkpoint: every step's loss (the events carry only some
    steps when steps are fast)."""
    done = sorted((p for p in (run_dir / "checkpoints").glob("step-*") if (p / "trainer_state.json").is_file()),
                  key=lambda p: int(p.name.split("-")[1]))
    if not done:
        raise StepFailed(f"run {run_dir.name} has no complete checkpoint")
    state: dict[str, Any] = json.loads((done[-1] / "trainer_state.json").read_text(encoding="utf-8"))
    return state


def losses(run_dir: Path) -> list[float]:
    return [loss for _, loss in sorted(trainer_state(run_dir).get("losses", []))]


def wait_frozen(run_dir: Path, follower: subprocess.Popen[str], timeout: float) -> int:
    """The pid of the run's training worker once it is stopped (SIGSTOP) at its fault point."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if follower.poll() is not None:
            tail = follower.stderr.read()[-300:] if follower.stderr else ""
            raise StepFailed(f"the training ended before its stop point (exit {follower.returncode}): {tail}")
        record = run_dir / "job.json"
        pid = int(json.loads(record.read_text(encoding="utf-8")).get("pid", 0)) if record.is_file() else 0
        if pid and _proc_state(pid) == "T":
            return pid
        time.sleep(0.2)
    raise StepFailed(f"the training did not reach its stop point within {timeout:.0f} s")


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


class VramSampler:
    """nvidia-smi's memory of every compute process, sampled twice a second while a step runs: the footprint
    torch's allocator does not count (CUDA context, cached blocks), as an operator sees it."""

    def __init__(self, gpu: bool) -> None:
        self.gpu = gpu and shutil.which("nvidia-smi") is not None
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> VramSampler:
        if self.gpu:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.gpu:
            self._thread.join(timeout=5)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            done = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                   "--format=csv,noheader,nounits"], capture_output=True, text=True, check=False)
            for line in done.stdout.splitlines():
                try:
                    self.peak_mb = max(self.peak_mb, float(line.split(",")[1]))
                except (IndexError, ValueError):
                    continue  # "[N/A]" on some drivers


# -- the machine --------------------------------------------------------------------------------------


def machine_line(gpu: bool, python: str) -> str:
    """GPU name, VRAM, driver, CUDA and torch, as the table's first line (or what the dry run ran on)."""
    versions = subprocess.run([python, "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                              capture_output=True, text=True, check=False).stdout.split()
    torch_text = f"torch {versions[0]}, CUDA {versions[1]}" if len(versions) == 2 else "torch not importable"
    if not gpu:
        cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                    if line.startswith("model name")), platform.processor() or "CPU")
        return f"CPU dry run: {cpu}, {os.cpu_count()} cores, {torch_text}, Python {platform.python_version()}"
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False).stdout.strip().splitlines()
    gpus = "; ".join(smi) if smi else "nvidia-smi gave nothing"
    return f"GPU: {gpus} (name, VRAM, driver); {torch_text}; Python {platform.python_version()}"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def llama_cuda_state(python: str) -> dict[str, Any]:
    """The installed llama-cpp-python's version and whether it can offload to a GPU, asked in a process of its
    own (loading the library starts the CUDA runtime when it has one)."""
    done = subprocess.run([python, __file__, "llama-state"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"version": None, "offload": False}
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


# -- children ------------------------------------------------------------------------------------------


def make_model(folder: Path, tokenizer_dir: Path, mode: str) -> dict[str, Any]:
    """A random-weight Llama in Hugging Face layout with the default's tokenizer: made on the GPU in bf16 for
    the real check (fast), on the CPU in float32 for the dry run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = 1 + max([*spec["model"]["vocab"].values(), *(t["id"] for t in spec.get("added_tokens", []))])
    shape, name = (LLAMA_1B, "Llama-3.2-1B shapes") if mode == "gpu" else (TINY, "tiny Llama (2 layers, hidden 64)")
    config = LlamaConfig(**shape, vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    device = "cuda" if mode == "gpu" else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if mode == "gpu":
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    for file in TOKENIZER_FILES:
        if (tokenizer_dir / file).is_file():
            shutil.copy2(tokenizer_dir / file, folder / file)
    return {"shape": f"{name}, vocab {vocab}", "device": device, "seconds": time.perf_counter() - started}


def decode(gguf: Path, gpu_layers: int) -> dict[str, Any]:
    """Decode tokens/s: DECODE_TOKENS greedy tokens after the prompt (its evaluation and the first token are not
    timed), whatever the random weights predict (end of text included: the loop does not stop on it)."""
    import llama_cpp

    offload = bool(llama_cpp.llama_supports_gpu_offload())
    llm = llama_cpp.Llama(model_path=str(gguf), n_gpu_layers=gpu_layers, n_ctx=256, seed=0, verbose=False)
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True)
    stream = llm.generate(tokens, temp=0.0)
    next(stream)
    started = time.perf_counter()
    count = 0
    for _ in stream:
        count += 1
        if count >= DECODE_TOKENS:
            break
    seconds = time.perf_counter() - started
    return {"tokens": count, "tokens_per_s": count / seconds, "n_gpu_layers": gpu_layers, "offload": offload,
            "version": llama_cpp.__version__}


def batches(model_dir: Path, train: Path, steps: int, max_seq_len: int, out: Path) -> dict[str, Any]:
    """The batches of the appliance's first `steps` steps (batch 4, seed 0, length-grouped: the training's
    defaults), through its own encoding, for the peer to train on the same tokens."""
    sys.path.insert(0, str(REPO))
    from appliance.templating import load_tokenizer
    from appliance.train.data import epoch_batches, load_split

    rows, _ = load_split(train, load_tokenizer(model_dir), max_seq_len)
    order = epoch_batches(rows, 4, 0, 0, True)[:steps]
    out.write_text(json.dumps([[{"input_ids": rows[i].input_ids, "labels": rows[i].labels} for i in batch]
                               for batch in order]), encoding="utf-8")
    return {"batches": len(order), "tokens": sum(len(rows[i].input_ids) for batch in order for i in batch)}


def llama_state() -> dict[str, Any]:
    import llama_cpp

    return {"version": llama_cpp.__version__, "offload": bool(llama_cpp.llama_supports_gpu_offload())}


def main() -> None:
    what, args = sys.argv[1], sys.argv[2:]
    if what == "make-model":
        answer = make_model(Path(args[0]), Path(args[1]), args[2])
    elif what == "decode":
        answer = decode(Path(args[0]), int(args[1]))
    elif what == "batches":
        answer = batches(Path(args[0]), Path(args[1]), int(args[2]), int(args[3]), Path(args[4]))
    elif what == "llama-state":
        answer = llama_state()
    else:
        sys.exit(f"unknown part {what!r}: make-model, decode, batches or llama-state")
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
