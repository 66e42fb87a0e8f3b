"""GPU benchmark of the distributed launch path: the same training as one plain process, as one
process through accelerate with FSDP, and (with more than one GPU) DDP over every GPU; then the
FSDP run's checkpoint resumed as a plain process (sharded optimizer state gathered, re-keyed and
loaded elsewhere).

    python bench/gpu/distributed.py kit            # here, on the CPU machine: bench/gpu/kit/
    python bench/gpu/distributed.py run [--steps 20] [--cpu]   # on the GPU machine, in one call

`kit` gathers what the GPU machine lacks: the default model's tokenizer, the sample data prepared
by this appliance, and the wheels of pydantic (which that machine's image does not have). `run`
builds a 1B-class Llama (Llama-3.2-1B shapes with this tokenizer's vocabulary, random weights:
speed does not depend on their values) in a scratch store and trains it through `appliance.jobs`
exactly as `appliance train` does. It prints real tokens/s, peak memory and the last loss of each
layout side by side, with the plain process as the peer. `--cpu` runs the same on a small model with
two CPU processes (FSDP2 and DDP over gloo), to check the script itself.

On the GPU machine, with `bench/gpu/kit` carried:

    pip install -q --no-index --no-deps --target /tmp/site bench/gpu/kit/wheels/*.whl && \\
      PYTHONPATH=/tmp/site:. python bench/gpu/distributed.py run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KIT = HERE / "kit"
REPO = HERE.parents[1]
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
          "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
          "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True}
WHEELS = ["pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "source.json")


def kit() -> None:
    """Here: the tokenizer, prepared data and wheels the GPU machine needs (bench/gpu/kit, not committed)."""
    sys.path.insert(0, str(REPO))
    from appliance.data.sample import shipped_path
    from appliance.store import Store

    store = Store.open()
    base = store.model_dir(store.resolve_model(None, "base model", "Run ./install.sh first."))
    shutil.rmtree(KIT, ignore_errors=True)
    (KIT / "tokenizer").mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, KIT / "tokenizer" / name)
    scratch = Path(tempfile.mkdtemp(prefix="kit-store-"))
    try:
        env = {**os.environ, "APPLIANCE_HOME": str(scratch)}
        os.symlink(base, Store.open(scratch).model_dir(base.name))
        done = subprocess.run([sys.executable, "-m", "appliance", "data", "prepare", str(shipped_path()), "--task",
                               "classification", "--label-field", "category", "--no-near-dup", "--json"],
                              env=env, capture_output=True, text=True, check=True)
        run_dir = scratch / "runs" / json.loads(done.stdout)["run"]
        shutil.copytree(run_dir / "data", KIT / "data")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(KIT / "wheels"), *WHEELS], check=True)
    size = sum(p.stat().st_size for p in KIT.rglob("*") if p.is_file())
    print(f"kit ready: {KIT} ({size / 2**20:.1f} MiB)")


def _store(root: Path, cuda: bool) -> tuple[Any, Path]:
    """A scratch store holding the random 1B-class model and a run with the kit's prepared data."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from appliance.store import Store

    store = Store.open(root)
    tokenizer = json.loads((KIT / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = len(tokenizer["model"]["vocab"]) + len(tokenizer.get("added_tokens", []))
    config = {**CONFIG, "vocab_size": vocab} if cuda else {**CONFIG, "hidden_size": 256, "intermediate_size": 1024,
                                                           "num_hidden_layers": 4, "num_attention_heads": 4,
                                                           "num_key_value_heads": 2, "vocab_size": vocab}
    folder = store.model_dir("bench-1b")
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    for item in (KIT / "tokenizer").iterdir():
        shutil.copy2(item, folder / item.name)
    info = json.loads((folder / "source.json").read_text(encoding="utf-8"))  # the default model's, re-described
    info.update(name="bench-1b", num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
                vocab_size=vocab, parameters=sum(p.numel() for p in model.parameters()), files={},
                notes=["random weights with Llama-3.2-1B shapes, for bench/gpu/distributed.py"])
    (folder / "source.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    del model
    return store, folder


def _train(store: Any, name: str, steps: int, **settings: Any) -> dict[str, Any]:
    from appliance import jobs
    from appliance.config import TrainConfig

    run_dir = store.runs_dir / name
    if not run_dir.exists():
        shutil.copytree(KIT / "data", run_dir / "data")
    cfg = TrainConfig(store=str(store.root), base_model="bench-1b", max_steps=steps, batch_size=4, max_seq_len=512,
                      eval_every=10_000, save_every=max(1, steps // 2), task_eval_items=0, backend="hf",
                      dtype="bfloat16", **settings)
    try:
        result: dict[str, Any] = jobs.run("train", run_dir, cfg).result
    except Exception as exc:  # noqa: BLE001 (a row of the table says what failed)
        return {"error": f"{type(exc).__name__}: {exc}"}
    return result


def run(steps: int, cpu: bool) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    cuda = torch.cuda.is_available() and not cpu
    gpus = torch.cuda.device_count() if cuda else 0
    root = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    try:
        store, _model = _store(root, cuda)
        layouts: list[tuple[str, str, dict[str, Any]]] = [("plain", "1 process, no launcher (peer)", {})]
        sharded = "fsdp-1" if cuda else "fsdp-2"
        if cuda:
            layouts.append((sharded, "1 process, accelerate FSDP", {"sharding": "fsdp"}))
        else:
            layouts.append((sharded, "2 processes, FSDP2 over gloo", {"processes": 2, "sharding": "fsdp"}))
        if gpus > 1 or not cuda:
            count = gpus if cuda else 2
            layouts.append((f"ddp-{count}", f"{count} processes, accelerate DDP", {"processes": count}))
        rows = []
        for name, label, settings in layouts:
            result = _train(store, name, steps, **settings)
            rows.append((label, result))
        # the FSDP run's last checkpoint (optimizer state gathered and keyed by position) continued plainly
        resumed = _train(store, sharded, steps + 4, resume=True)
        rows.append(("FSDP checkpoint resumed as 1 plain process", resumed))
        print(f"\n{'layout':46} {'steps':>5} {'tokens/s':>9} {'peak MiB':>9} {'loss':>7} {'seconds':>8}")
        for label, result in rows:
            if "error" in result:
                print(f"{label:46} {result['error']}")
                continue
            rate = result["real_tokens"] / max(1e-9, result["train_seconds"])
            print(f"{label:46} {result['steps']:>5} {rate:>9.0f} {result['peak_mem_mb']:>9.0f} "
                  f"{result['train_loss']:>7.3f} {result['seconds']:>8.1f}")
        device = torch.cuda.get_device_name(0) if cuda else "CPU"
        print(f"\n{device}, {gpus or 'no'} GPU(s); torch {torch.__version__}; batch 4 x up to 512 tokens, bf16, "
              f"LoRA r16 on every projection; `python bench/gpu/distributed.py run --steps {steps}`")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["kit", "run"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpu", action="store_true", help="run what a CPU can, to check the script")
    args = parser.parse_args()
    if args.what == "kit":
        kit()
    else:
        run(args.steps, args.cpu)


if __name__ == "__main__":
    main()
