"""Benchmark: evaluation speed (items per second) of the Hugging Face and GGUF targets, against their peers.

    .venv/bin/python bench/eval_speed.py [--items 24] [--max-new 24] [--quants F16,Q8_0] [--json]

A scratch store borrows the default model (SmolLM2-135M-Instruct, a link, not a copy) and prepares
the shipped helpdesk sample as classification; the first N items of its test split are asked, with
the prompts and candidate answers that `appliance eval` builds. The base model, no fine-tuning, and
GGUF files converted from it here (F16, then the quantizations). Two ways evaluation asks a model:
- score: one call per item with one candidate per label. Ours (`HFTarget.score`): the prompt runs
  once (`logits_to_keep=1`) from the cache of what the prompts share, and every label in one batch
  over its repeated KV cache. Peer: one full forward per
  prompt + label with the logits of every position, then log-softmax (what many eval scripts do).
- generate: greedy, up to --max-new tokens. Ours: `HFTarget.generate` (batched); peer: transformers
  `model.generate` one prompt at a time. GGUF: `GGUFTarget.generate`; peer: llama-cpp-python
  `create_completion(prompt_tokens, max_tokens, temperature=0)` on the same loaded model.
The candidate answers are built as `appliance eval` builds them, per item (timed: it runs beside each score
call). Every timed pass follows one untimed warm-up call. Check column: same answers as the reference named.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"


def _prepare(tmp: Path) -> Path:
    from appliance.data.sample import shipped_path
    from appliance.store import Store

    store = Store.open(tmp / "store")
    os.symlink(Store.open().model_dir(MODEL), store.model_dir(MODEL))
    out = subprocess.run([sys.executable, "-m", "appliance", "data", "prepare", str(shipped_path()), "--task",
                          "classification", "--label-field", "category", "--no-near-dup", "--json"],
                         capture_output=True, text=True, cwd=REPO, check=False,
                         env={**os.environ, "APPLIANCE_HOME": str(store.root)})
    if out.returncode != 0:
        sys.exit(f"data prepare failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return store.runs_dir / json.loads(out.stdout)["run"]


def naive_score(model: Any, prompt: list[int], answers: list[list[int]]) -> list[float]:
    """The peer: a full forward of prompt + answer for each answer, logits at every position."""
    import torch

    scores = []
    with torch.no_grad():
        for answer in answers:
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1)
            scores.append(float(log_probs[positions, torch.tensor(answer)].sum()))
    return scores


def one_by_one(model: Any, prompt: list[int], max_new: int, stop_ids: list[int]) -> list[int]:
    """The generation peer: transformers `generate` on one prompt, cut at the first stop token."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=stop_ids[0], eos_token_id=stop_ids)
    new = out[0, len(prompt):].tolist()
    return next((new[:i] for i, t in enumerate(new) if t in stop_ids), new)


def timed(call: Callable[[Any], Any], inputs: list[Any], reset: Callable[[], None] = lambda: None,
          warm: Any = None) -> tuple[float, list[Any]]:
    """One untimed warm-up call (on `warm`, else the first input), then every input: (seconds, outputs)."""
    reset()
    call(inputs[0] if warm is None else warm)
    reset()
    began = time.perf_counter()
    outputs = [call(x) for x in inputs]
    return time.perf_counter() - began, outputs


def same(a: list[Any], b: list[Any]) -> str:
    return f"{sum(x == y for x, y in zip(a, b, strict=True))}/{len(a)}"


def measure(args: argparse.Namespace, quants: list[str]) -> dict[str, Any]:
    from appliance import offline

    offline.activate()
    from appliance import templating as encoding
    from appliance import toolchain
    from appliance.evaluate.targets import GGUFTarget, HFTarget
    from appliance.run import Run
    from appliance.store import Store
    from appliance.templating import load_tokenizer

    load = os.getloadavg()[0]
    model_dir = Store.open().model_dir(MODEL)
    rows: list[dict[str, Any]] = []

    def row(stage: str, path: str, method: str, seconds: float, n: int, peer: str | None = None,
            tokens: int | None = None, check: str = "") -> None:
        rows.append({"stage": stage, "path": path, "method": method, "seconds": seconds, "items": n,
                     "items_per_s": n / seconds, "peer": peer, "tokens": tokens, "check": check})

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as name:
        tmp = Path(name)
        print("... preparing the shipped sample", file=sys.stderr)
        run_dir = _prepare(tmp)
        run = Run.at(run_dir)
        items = run.items("test", args.items)
        labels = run.require_data_report().label_set
        tokenizer = load_tokenizer(model_dir)
        stop_ids = encoding.stop_ids(tokenizer)
        prompts = [encoding.prompt_ids(tokenizer, i.prompt) for i in items]
        built, answers = timed(lambda i: [encoding.answer_ids(tokenizer, i.prompt, label) for label in labels], items)
        pairs = list(zip(prompts, answers, strict=True))
        n = len(items)
        row("prepare", "tokenizer", "candidate answers: answer_ids per label, as run._evaluate", built, n)

        def argmax(scores: list[float]) -> str:
            return labels[max(range(len(labels)), key=scores.__getitem__)]

        print(f"... HF: {n} items, {len(labels)} labels", file=sys.stderr)
        hf = HFTarget("base", model_dir)
        s_ours, cached = timed(lambda p: hf.score(*p), pairs)
        s_peer, naive = timed(lambda p: naive_score(hf.model, *p), pairs)
        hf_labels = [argmax(s) for s in cached]
        gap = max(abs(a - b) for c, v in zip(cached, naive, strict=True) for a, b in zip(c, v, strict=True))
        row("score", "HF", "ours: HFTarget.score (shared prefix, labels batched)", s_ours, n, "naive",
            check=f"argmax = naive {same(hf_labels, [argmax(s) for s in naive])}, max |Δlogp| {gap:.1e}")
        row("score", "HF", "naive: full forward per prompt+label, all logits", s_peer, n)
        g_ours, batched = timed(lambda ps: hf.generate(ps, args.max_new, stop_ids), [prompts], warm=prompts[:1])
        g_peer, single = timed(lambda p: one_by_one(hf.model, p, args.max_new, stop_ids), prompts)
        hf_gen = batched[0]
        row("generate", "HF", f"ours: HFTarget.generate (batch {hf.batch_size})", g_ours, n, "one-by-one",
            sum(map(len, hf_gen)), check=f"tokens = one-by-one {same(hf_gen, single)}")
        row("generate", "HF", "transformers model.generate, one prompt at a time", g_peer, n,
            tokens=sum(map(len, single)))
        hf.close()

        f16 = tmp / "model-F16.gguf"
        print("... converting to GGUF F16", file=sys.stderr)
        toolchain.convert_to_gguf(model_dir, f16, "f16")

        def gguf_rows(quant: str, path: Path) -> None:
            gguf = GGUFTarget(f"gguf:{quant}", path, n_ctx=min(8192, 2 * max(map(len, prompts)) + 1024))
            llm, label = gguf.llm, f"GGUF {quant}"
            s_ours, scored = timed(lambda p: gguf.score(*p), pairs, llm.reset)
            g_labels = [argmax(s) for s in scored]
            row("score", label, "ours: GGUFTarget.score (prefix cache, last logits)", s_ours, n,
                check=f"label = HF {same(g_labels, hf_labels)}")
            g_ours, gen = timed(lambda p: gguf.generate([p], args.max_new, stop_ids)[0], prompts, llm.reset)
            g_peer, done = timed(lambda p: llm.create_completion(p, max_tokens=args.max_new, temperature=0), prompts,
                                 llm.reset)
            ours_text = [tokenizer.decode(g, skip_special_tokens=True) for g in gen]
            row("generate", label, "ours: GGUFTarget.generate", g_ours, n, "create_completion", sum(map(len, gen)),
                check=f"tokens = HF {same(gen, hf_gen)}")
            row("generate", label, "llama-cpp create_completion(temperature=0)", g_peer, n,
                tokens=sum(d["usage"]["completion_tokens"] for d in done),
                check=f"text = ours {same([d['choices'][0]['text'] for d in done], ours_text)}")
            gguf.close()

        for quant in quants:
            path = f16 if quant == "F16" else tmp / f"model-{quant}.gguf"
            if not path.is_file():
                toolchain.quantize(f16, path, quant)
            print(f"... GGUF {quant}", file=sys.stderr)
            gguf_rows(quant, path)
    for r in rows:  # the speed-up of each "ours" row over its peer, the row right after it of the same path
        if r["peer"]:
            peer = next(p for p in rows[rows.index(r) + 1:] if p["path"] == r["path"] and p["stage"] == r["stage"])
            r["vs_peer"] = r["items_per_s"] / peer["items_per_s"]
    from bench.export import _machine

    return {"machine": _machine(), "items": n, "labels": labels, "max_new": args.max_new, "rows": rows,
            "load": [load, os.getloadavg()[0]]}


def show(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Evaluation speed on {MODEL} (base), {result['items']} test items of the helpdesk sample, "
                  f"{len(result['labels'])} labels, greedy up to {result['max_new']} new tokens",
                  caption="items/s of the timed pass after one warm-up call; vs peer: ours / the peer row below it; "
                  "check: answers equal to the reference named (HF = the HF score/generate rows above)")
    for column in ("stage", "path", "method", "items/s", "vs peer", "new tok/s", "check"):
        table.add_column(column, justify="right" if column in ("items/s", "vs peer", "new tok/s") else "left")
    for r in result["rows"]:
        table.add_row(r["stage"], r["path"], r["method"], f"{r['items_per_s']:.2f}",
                      f"{r['vs_peer']:.2f}x" if r.get("vs_peer") else "",
                      f"{r['tokens'] / r['seconds']:.1f}" if r["tokens"] is not None else "", r["check"])
    console = Console(width=max(160, Console().width))
    console.print(table)
    console.print(f"machine: {result['machine']}, 1-min load average {result['load'][0]:.2f} at the start, "
                  f"{result['load'][1]:.2f} at the end")
    console.print(f"reproduce: {result['command']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=24, help="test items asked (the sample's test split has 48)")
    parser.add_argument("--max-new", type=int, default=24, help="new-token budget of the generation rows")
    parser.add_argument("--quants", default="F16,Q8_0", help="GGUF files to measure, comma-separated (F16 first)")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON instead of a table")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    quants = [q.strip().upper() for q in args.quants.split(",") if q.strip()]
    result = measure(args, quants)
    result["command"] = shlex.join([".venv/bin/python", "bench/eval_speed.py", *sys.argv[1:]])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        show(result)


if __name__ == "__main__":
    main()
