"""GPU benchmark: Unsloth QLoRA against transformers + peft + bitsandbytes QLoRA.

    python bench/gpu/qlora_compare.py [--steps 30] [--batch-size 4] [--seq-len 1024]
    python bench/gpu/qlora_compare.py --child hf MODEL_DIR --batches FILE [--steps 30]   (bench/gpu/check.py)

A 1B-class Llama (Llama-3.2-1B shapes, random weights: speed does not depend on their values)
in 4-bit NF4 with double quantisation, LoRA rank 16 on every linear layer, bf16 compute, the
same random token batches for both, each in its own process so peak VRAM is its own. Prints
real tokens/s and peak VRAM side by side. Made for one call on a lent GPU machine (under 10
minutes); `bench/gpu/prepare_wheels.sh` gathers what that machine lacks.
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

CONFIG = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
          "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_model(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)


def token_batches(batch: int, seq: int, vocab: int, path: Path | None) -> tuple[list[dict[str, Any]], list[int]]:
    """The batches to train on and the real tokens of each: random full-length rows, or those of a file of
    batches of {input_ids, labels} rows (the appliance's own, written by bench/gpu/check.py), right-padded."""
    import torch

    if path is None:
        generator = torch.Generator().manual_seed(0)
        ids = [torch.randint(3, vocab, (batch, seq), generator=generator) for _ in range(4)]
        return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids], [batch * seq] * 4
    batches, real = [], []
    for rows in json.loads(path.read_text(encoding="utf-8")):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(row["input_ids"]), torch.tensor(row["labels"]), 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        real.append(int(mask.sum()))
    return batches, real


def child(backend: str, folder: Path, steps: int, batch: int, seq: int, batches_file: Path | None = None) -> None:
    import torch

    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=seq, dtype=torch.bfloat16,
                                                     load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS,
                                                 use_gradient_checkpointing="unsloth")
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": 0})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batches, real = token_batches(batch, seq, CONFIG["vocab_size"], batches_file)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    tokens = 0
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps (kernel autotuning, allocator)
            torch.cuda.synchronize()
            started = time.perf_counter()
        tokens += real[step % len(batches)] if step >= 2 else 0
        loss = model(**{k: v.cuda() for k, v in batches[step % len(batches)].items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    print(json.dumps({"tokens_per_s": tokens / seconds, "peak_vram_mb":
                      torch.cuda.max_memory_reserved() / 2**20, "loss": float(loss)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batches", type=Path, help="train on these batches (a JSON list of lists of "
                        "{input_ids, labels}) instead of random ones")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.steps, args.batch_size, args.seq_len, args.batches)
        return
    import torch

    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_model(Path(tmp))
        for backend in ("hf", "unsloth"):
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--batch-size",
                                  str(args.batch_size), "--seq-len", str(args.seq_len), "--child", backend, tmp],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{backend} failed:\n{out.stderr[-2500:]}")
                continue
            rows[backend] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nQLoRA r=16, Llama 1B shapes, {args.batch_size} x {args.seq_len} tokens, {args.steps} steps")
    print(f"{'backend':<28} {'tokens/s':>10} {'peak VRAM MB':>13}")
    names = {"hf": "transformers+peft+bnb", "unsloth": "unsloth"}
    for backend, r in rows.items():
        print(f"{names[backend]:<28} {r['tokens_per_s']:>10.0f} {r['peak_vram_mb']:>13.0f}")
    if len(rows) == 2:
        print(f"unsloth / hf: {rows['unsloth']['tokens_per_s'] / rows['hf']['tokens_per_s']:.2f}x tokens/s, "
              f"{rows['unsloth']['peak_vram_mb'] / rows['hf']['peak_vram_mb']:.2f}x VRAM")


if __name__ == "__main__":
    main()
