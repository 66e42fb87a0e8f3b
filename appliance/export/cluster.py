"""What a cluster serving engine needs to serve the merged 16-bit model: launch scripts for vLLM and
Hugging Face TGI with the tensor-parallel degree the planner suggests, and the chat template the model
was trained with. For more traffic than one llama.cpp process carries; the appliance does not balance
load itself: these engines batch requests and shard the model across GPUs, and a replica per node
behind the site's own load balancer scales out further.

Both engines are told to stay offline and not to report usage, like everything the appliance runs."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.planner import ServingPlan, serving_plan

OFFLINE = "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1"
MAX_CONTEXT = 8192


def plan_for(merged_dir: Path, gpu_gib: float) -> ServingPlan:
    config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    context = min(int(config.get("max_position_embeddings") or 4096), MAX_CONTEXT)
    return serving_plan(config, gpu_gib * 1024, context)


def _degree(plan: ServingPlan) -> int:
    return plan.tensor_parallel or 8


def vllm_script(merged_dir: Path, template: Path, name: str, plan: ServingPlan) -> str:
    return f"""#!/bin/sh
# Serve {name} with vLLM: the merged 16-bit model, its chat template, tensor-parallel over TP GPUs.
# {_why(plan)}
# Change TP, PORT or HOST by setting them first, e.g.  TP=4 sh vllm.sh
set -eu
TP="${{TP:-{_degree(plan)}}}"
exec env {OFFLINE} vllm serve "{merged_dir}" \\
  --served-model-name "{name}" \\
  --tensor-parallel-size "$TP" \\
  --dtype bfloat16 \\
  --max-model-len {plan.context} \\
  --chat-template "{template}" \\
  --host "${{HOST:-127.0.0.1}}" --port "${{PORT:-8000}}"
"""


def tgi_script(merged_dir: Path, name: str, plan: ServingPlan) -> str:
    return f"""#!/bin/sh
# Serve {name} with Hugging Face text-generation-inference, sharded over TP GPUs.
# {_why(plan)}
# TGI reads the chat template from the model folder ({merged_dir.name}/chat_template.jinja, the one the model
# was trained with). Change TP, PORT or HOST by setting them first, e.g.  TP=4 sh tgi.sh
set -eu
TP="${{TP:-{_degree(plan)}}}"
exec env {OFFLINE} text-generation-launcher \\
  --model-id "{merged_dir}" \\
  --num-shard "$TP" \\
  --dtype bfloat16 \\
  --max-input-tokens {plan.context - 1} --max-total-tokens {plan.context} \\
  --usage-stats off \\
  --hostname "${{HOST:-127.0.0.1}}" --port "${{PORT:-8080}}"
"""


def _why(plan: ServingPlan) -> str:
    gib = plan.gpu_mb / 1024
    if plan.tensor_parallel is None:
        return (f"No degree up to 8 fits {gib:g} GiB GPUs ({plan.per_gpu_mb / 1024:.1f} GiB each at 8): use larger "
                "GPUs, or a shorter --max-model-len.")
    return (f"TP={plan.tensor_parallel}: weights {plan.weights_mb / 1024:.1f} GiB + KV cache of {plan.sequences} x "
            f"{plan.context} tokens = {plan.per_gpu_mb / 1024:.1f} GiB per GPU, within 90% of {gib:g} GiB.")


def readme_section(plan: ServingPlan) -> str:
    return ("\n## More traffic than one llama.cpp process carries\n\n"
            "`vllm.sh` and `tgi.sh` serve the merged 16-bit model (the `merged/` folder of this run) on GPUs with "
            "continuous batching, behind the same OpenAI-compatible API. "
            f"{_why(plan)} Run one replica per node and put the site's load balancer in front for more.\n")
