"""Benchmark: training throughput (real, non-padding tokens per second) and peak memory.

    .venv/bin/python bench/train_throughput.py [--steps 30] [--batch-size 4]

Same base model (the embedded SmolLM2-135M-Instruct), same prepared data (the shipped helpdesk
sample), same LoRA (rank 16, all linear layers), same number of steps and rows per step, each in
its own process. The peer is what a user would otherwise write: TRL's SFTTrainer with default
settings (plus `use_cpu=True`, which it demands on a CPU). TRL 1.15's fused loss kernel needs
Triton, which CPU hosts lack, so the peer gets a plain-torch stand-in for that one function (full
logits, the same maths). Time counts the training loop only, not model loading.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]




def _patch_trl_for_cpu() -> None:
    import torch
    import trl.trainer.utils as trl_utils

    class TorchLogProb:
        @staticmethod
        def apply(hidden: Any, weight: Any, bias: Any, targets: Any, temperature: float, chunk_size: int,
                  softcap: float | None = None, logit_scale: float = 1.0,
                  outputs: tuple[str, ...] = ()) -> tuple[Any, ...]:
            logits = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            logp = torch.log_softmax(logits / temperature, dim=-1)
            chosen = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            entropy = -(logp.exp() * logp).sum(-1).detach() if "entropy" in outputs else None
            top1 = (logits.argmax(-1) == targets) if "is_top1" in outputs else None
            return chosen, entropy, None, None, top1

    trl_utils._ChunkedLogProbFunction = TorchLogProb


def child(mode: str, run_dir: Path, store: Path, steps: int, batch_size: int) -> None:
    from appliance import offline

    offline.activate()
    if mode.startswith("appliance"):
        from appliance import events as ev
        from appliance.config import TrainConfig
        from appliance.train import loop

        backend = mode.split("-", 1)[1]
        cfg = TrainConfig(store=str(store), backend=backend, max_steps=steps, batch_size=batch_size, rank=16,
                          alpha=32, max_seq_len=512, eval_every=10**6, save_every=10**6)
        result = loop.run(cfg, run_dir, ev.Emitter(lambda e: None))
        out = {"tokens": result.real_tokens, "seconds": result.train_seconds, "loss": result.train_loss}
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        _patch_trl_for_cpu()
        model_dir = store / "base" / "smollm2-135m-instruct"
        rows = [json.loads(line) for line in (run_dir / "data" / "train.jsonl").read_text().splitlines()]
        data = Dataset.from_list([{"messages": r["messages"]} for r in rows])
        extra = {"bf16": True} if mode == "trl-bf16" else {}
        args = SFTConfig(output_dir=str(run_dir / "trl"), max_steps=steps, per_device_train_batch_size=batch_size,
                         report_to="none", logging_steps=1, save_strategy="no", use_cpu=True, **extra)
        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=data,
                             processing_class=AutoTokenizer.from_pretrained(model_dir),
                             peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
        started = time.perf_counter()
        metrics = trainer.train().metrics
        seconds = time.perf_counter() - started
        tokens = max(h.get("num_tokens", 0) for h in trainer.state.log_history)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        out = {"tokens": tokens, "seconds": metrics.get("train_runtime", seconds), "loss": losses[-1]}
    from appliance.hardware import peak_rss_mb

    out["peak_mb"] = peak_rss_mb()
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["appliance-hf", "appliance-unsloth", "trl-default", "trl-bf16"])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, run_dir, store = args.child
        child(mode, Path(run_dir), Path(store), args.steps, args.batch_size)
        return
    sys.path.insert(0, str(REPO))
    import shutil

    from appliance.data.sample import shipped_path
    from appliance.store import Store

    default = Store.open()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "store")
        (store.base_dir / "smollm2-135m-instruct").symlink_to(default.model_dir("smollm2-135m-instruct"))
        prep = subprocess.run([sys.executable, "-m", "appliance", "--store", str(store.root), "data", "prepare",
                               str(shipped_path()), "--task", "classification", "--label-field", "category",
                               "--no-near-dup", "--json"], capture_output=True, text=True, check=True, cwd=REPO)
        source = store.runs_dir / json.loads(prep.stdout)["run"]
        results = {}
        for mode in args.modes:
            run_dir = store.runs_dir / f"bench-{mode}"
            shutil.copytree(source / "data", run_dir / "data")
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--batch-size",
                                  str(args.batch_size), "--child", mode, str(run_dir), str(store.root)],
                                 capture_output=True, text=True, cwd=REPO)
            if out.returncode != 0:
                print(f"{mode} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[mode]
            print(f"... {mode}: {r['tokens'] / r['seconds']:.0f} tokens/s", file=sys.stderr)
    peer = results.get("trl-default")
    print(f"\n{args.steps} steps x {args.batch_size} rows, LoRA r=16 on all linear layers, SmolLM2-135M, CPU")
    print(f"{'trainer':<22} {'real tok/s':>10} {'vs peer':>8} {'peak MB':>8} {'final loss':>10}")
    names = {"appliance-hf": "appliance (hf)", "appliance-unsloth": "appliance (unsloth)",
             "trl-default": "TRL SFTTrainer default", "trl-bf16": "TRL SFTTrainer bf16"}
    for mode, r in results.items():
        rate = r["tokens"] / r["seconds"]
        ratio = f"{rate / (peer['tokens'] / peer['seconds']):.2f}x" if peer else "-"
        print(f"{names.get(mode, mode):<22} {rate:>10.0f} {ratio:>8} {r['peak_mb']:>8.0f} {r['loss']:>10.3f}")


if __name__ == "__main__":
    main()
