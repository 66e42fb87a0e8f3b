"""Benchmark: merging a LoRA adapter into its base, streamed (ours) against peft's merge_and_unload.

    .venv/bin/python bench/merge.py [--shape smollm2-135m,llama-3.2-1b] [--rank 16] [--keep DIR] [--json]

For each shape, a base model and a rank-16 adapter on every linear layer:
- smollm2-135m: the real default model from the store, with a random adapter;
- llama-3.2-1b, llama-3.1-8b, qwen2.5-7b: random bf16 weights in the published config's shapes, written a
  tensor at a time (the values do not change the memory or the time of a merge).
Then, each in its own process, peak memory measured over the process's baseline after its imports:
- ours: `appliance.export.merge`, tensor by tensor over the shards, float32 delta rounded once to bf16;
- peft: what other tools do: load the base in bf16, PeftModel.from_pretrained, merge_and_unload(),
  save_pretrained. (Our old merge did this in float32: twice the memory again.)
The peer is skipped where its bf16 model would not fit in the memory available now.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT = "smollm2-135m-instruct"
_LLAMA3_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}
SHAPES: dict[str, dict[str, Any]] = {  # from each model's published config.json
    "llama-3.2-1b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                     "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                     "rope_scaling": _LLAMA3_ROPE, "torch_dtype": "bfloat16"},
    "llama-3.1-8b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                     "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0}, "torch_dtype": "bfloat16"},
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "torch_dtype": "bfloat16"},
}
SHARD_BYTES = 5 << 30

_MEASURE = """
import json, sys, time
from pathlib import Path
import torch, transformers, peft
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
from appliance import events as ev
from appliance.export import merge
from appliance.hardware import peak_rss_mb, reset_peak_rss, rss_mb
tool, base, adapter, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
reset_peak_rss()
baseline = rss_mb()
started = time.perf_counter()
if tool == "ours":
    merge._merge_into(out, adapter, base, "bench", "cpu", ev.Emitter(lambda e: None))
else:
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(str(out))
print(json.dumps({"seconds": time.perf_counter() - started, "baseline_mb": baseline, "peak_mb": peak_rss_mb()}))
"""


def default_base() -> Path:
    home = Path(os.environ.get("APPLIANCE_HOME", REPO / "models"))
    folder = home / "base" / DEFAULT
    if not (folder / "config.json").is_file():
        sys.exit(f"{folder} is missing: run ./install.sh first (it imports the default model)")
    return folder


def random_base(shape: str, folder: Path) -> None:
    """A model of `shape` with random bf16 weights, written a tensor at a time in shards of 5 GB."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from appliance import tensorfile

    settings = SHAPES[shape]
    config = AutoConfig.for_model(**{k: v for k, v in settings.items() if k != "architectures"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tensors = [(name, tuple(p.shape)) for name, p in model.state_dict().items()
               if not (config.tie_word_embeddings and name == "lm_head.weight")]
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in tensors:
        nbytes = tensorfile.nbytes("BF16", dims)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, "BF16", dims))
        size += nbytes
    folder.mkdir(parents=True)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    generator = torch.Generator().manual_seed(0)
    for file, layout in zip(names, shards, strict=True):
        writer = tensorfile.Writer(folder / file, layout)
        for name, _dtype, dims in layout:
            rows = dims[0]
            step = max(1, (1 << 24) // max(1, math.prod(dims[1:])))
            for start in range(0, rows, step):
                block = torch.randn((min(step, rows - start), *dims[1:]), generator=generator) * 0.02
                writer.write(name, (block + 1.0 if name.endswith("norm.weight") else block).to(torch.bfloat16))
        writer.close()
    weight_map = {name: file for file, layout in zip(names, shards, strict=True) for name, _d, _s in layout}
    total = sum(tensorfile.nbytes(d, s) for layout in shards for _n, d, s in layout)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps({**settings, "use_cache": True}, indent=2))


def random_adapter(base: Path, folder: Path, rank: int) -> int:
    """A rank-`rank` LoRA adapter on every linear layer but the head, random A and B (float32, as trained);
    the tokenizer files of the default model beside it, as a run's adapter folder has. Its parameters."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(1)
    weights, targets = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            out_features, in_features = module.weight.shape
            key = f"base_model.model.{name}"
            weights[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / 30
            weights[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) / 30
            targets.add(name.rsplit(".", 1)[-1])
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": sorted(targets), "bias": "none", "base_model_name_or_path": str(base)}, indent=2))
    for file in default_base().iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(file, folder / file.name)
    return sum(t.numel() for t in weights.values())


def measure(tool: str, base: Path, adapter: Path, out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", _MEASURE, tool, str(base), str(adapter), str(out)],
                          capture_output=True, text=True, env=env, check=False)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode:
        return {"tool": tool, "error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"tool": tool, **result, "over_baseline_mb": result["peak_mb"] - result["baseline_mb"], "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m,llama-3.2-1b",
                        help="comma-separated: smollm2-135m, " + ", ".join(SHAPES))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--keep", type=Path, help="build the models here and keep them (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from appliance.hardware import memory

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    rows = []
    try:
        for shape in args.shape.split(","):
            base = default_base() if shape == "smollm2-135m" else work / shape / "base"
            if shape != "smollm2-135m" and not (base / "config.json").is_file():
                began = time.perf_counter()
                random_base(shape, base)
                print(f"{shape}: random base written in {time.perf_counter() - began:.0f} s", file=sys.stderr)
            adapter = work / shape / "adapter"
            shutil.rmtree(adapter, ignore_errors=True)
            lora_params = random_adapter(base, adapter, args.rank)
            model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
            for tool in ("ours", "peft"):
                if tool == "peft" and model_bytes * 2.2 > memory().available_mb * 2**20:
                    rows.append({"shape": shape, "tool": tool, "error": "skipped: its bf16 model does not fit"})
                    continue
                row = measure(tool, base, adapter, work / shape / f"merged-{tool}")
                rows.append({"shape": shape, "model_gb": model_bytes / 1e9, "lora_params": lora_params, **row})
                print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    mem = memory()
    print(f"merge of a rank-{args.rank} all-linear LoRA adapter; {os.cpu_count()} CPUs, "
          f"{mem.total_mb / 1024:.1f} GiB RAM ({mem.available_mb / 1024:.1f} available)")
    print(f"{'shape':<14} {'model GB':>8} {'tool':<5} {'seconds':>8} {'peak MB':>8} {'over baseline MB':>17}")
    for row in rows:
        if "error" in row:
            print(f"{row['shape']:<14} {'':>8} {row['tool']:<5} {row['error']}")
            continue
        print(f"{row['shape']:<14} {row['model_gb']:>8.2f} {row['tool']:<5} {row['seconds']:>8.1f} "
              f"{row['peak_mb']:>8.0f} {row['over_baseline_mb']:>17.0f}")


if __name__ == "__main__":
    main()
