"""The evaluation stage: `appliance eval` as a job.

Every target answers the same prompts of the run's test split: the base model zero-shot, the base
model with k training examples (few-shot), the fine-tuned model (base + adapter), the merged model
and every exported GGUF. Each gets the task's metrics with bootstrap intervals in
`eval/<target>.json`; `eval/comparison.json` says whether fine-tuning beat prompting, whether each
quantization kept the fine-tuned model's quality, and recommends the smallest one that did.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from appliance import manifest
from appliance.config import EvalConfig
from appliance.errors import ApplianceError
from appliance.evaluate import metrics
from appliance.evaluate.items import choose_examples, with_examples
from appliance.evaluate.targets import GGUFTarget, HFTarget, Target, compute_device
from appliance.events import Emitter
from appliance.records import ComparisonRow, EvalResult, Interval, Recommendation, TargetResult, TargetRow
from appliance.run import Item, Run, plain_name
from appliance.store import Store
from appliance.templating import answer_ids, load_tokenizer, prompt_ids, stop_ids

PRIMARY = {"classification": "accuracy", "extraction": "all_fields_match", "chat": "token_f1"}
SPEED_TOKENS = 32
SAMPLES_KEPT = 20


class EvalError(ApplianceError):
    title = "Evaluation problem"


def run(cfg: EvalConfig, run_dir: Path, emit: Emitter) -> EvalResult:
    started = time.monotonic()
    store = Store.open(cfg.store)
    target_run = Run(store, run_dir)
    report = target_run.data_report()
    if report is None:
        raise EvalError(f"run {target_run.id} has no prepared data", f"Prepare data first: appliance data prepare "
                        f"FILES --run {target_run.id}")
    task, labels = report.task, report.label_set
    items = target_run.items(cfg.split, cfg.max_items)
    if not items:
        raise EvalError(f"the {cfg.split} split of run {target_run.id} has no rows with an answer",
                        "Prepare the data with a test share (--split 0.8,0.1,0.1), or evaluate --split val.")
    base_dir = target_run.base_model_dir()
    targets = _resolve_targets(cfg, target_run)
    _check_memory(targets, target_run, base_dir)
    tokenizer = load_tokenizer(target_run.adapter_dir if target_run.trained else base_dir)
    stops = stop_ids(tokenizer)
    examples = choose_examples(items, target_run.items("train"), cfg.fewshot_k, cfg.fewshot_select, store.root,
                               cfg.seed) if "fewshot" in targets else None
    schema = target_run.schema()
    results: list[TargetResult] = []
    for position, name in enumerate(targets):
        emit.check_cancelled()
        emit.progress(f"evaluating {name}", position, len(targets))
        target = _open(name, target_run, base_dir, items, tokenizer)
        try:
            conversations = [with_examples(i, e) for i, e in zip(items, examples, strict=True)] \
                if name == "fewshot" and examples is not None else [i.prompt for i in items]
            result = _evaluate(target, name, conversations, items, task, labels, tokenizer, stops, cfg, emit, schema)
        finally:
            target.close()
        result.size_bytes = _size(name, target_run, base_dir)
        result.runtime = target.runtime
        emit.log(f"{name}: {target.runtime}")
        target_run.write_evaluation(result)
        emit.metric(f"eval_{name}_{result.primary}", result.score.point)
        results.append(result)
    references = [i.label or i.reference for i in items]
    outcome = _compare(target_run, task, cfg, results, references, labels, round(time.monotonic() - started, 1))
    target_run.write_comparison(outcome)
    if target_run.manifest_path.is_file():  # an exported run's signed manifest gains the results (signed again)
        manifest.write(target_run)
    return outcome


def _exported(run: Run) -> dict[str, Path]:
    """Registered GGUF files (they passed the export gate), by quantization."""
    record = run.verification()
    if record is None:
        return {}
    return {quant: run.gguf_dir / f.file for quant, f in record.served().items()
            if plain_name(f.file) and (run.gguf_dir / f.file).is_file()}


def _resolve_targets(cfg: EvalConfig, run: Run) -> list[str]:
    exported = _exported(run)
    wanted = cfg.targets or (["base", "fewshot"] + (["tuned"] if run.trained else []) + ["gguf"])
    names: list[str] = []
    for name in wanted:
        if name == "gguf":
            names += [f"gguf:{q}" for q in exported]
            continue
        if name.startswith("gguf:") and name[5:].upper() not in exported:
            raise EvalError(f"run {run.id} has no verified {name[5:].upper()} GGUF",
                            f"Export it first: appliance export --run {run.id} --quant {name[5:].upper()}")
        if name == "tuned" and not run.trained:
            raise EvalError(f"run {run.id} has no trained adapter", f"Train it: appliance train --run {run.id}")
        if name == "merged" and not run.merged_dir.is_dir():
            raise EvalError(f"run {run.id} has no merged model", f"Export it: appliance export --run {run.id}")
        names.append(name if not name.startswith("gguf:") else f"gguf:{name[5:].upper()}")
    return list(dict.fromkeys(names))


def _check_memory(targets: list[str], run: Run, base_dir: Path) -> None:
    """Refuse before the first target loads when one of them cannot fit in the memory available: Hugging Face
    targets hold the model at 16 bits at least (plus the adapter), llama.cpp targets their file and a KV cache."""
    import json

    from appliance import pipeline_plan as pp
    from appliance import planner

    config = pp.text_config(json.loads((base_dir / "config.json").read_text(encoding="utf-8")))
    kv = pp.kv_bytes_per_token(config) * pp.EVAL_CONTEXT / 2**20
    need: dict[str, float] = {}
    for name in targets:
        if name.startswith("gguf:") or (name == "merged" and compute_device().type == "cpu"):
            record = run.verification()
            quant = name[5:] if name.startswith("gguf:") else record.reference if record is not None else ""
            path = _exported(run).get(quant or "")
            if path is not None:
                need[name] = pp.TORCH_RUNTIME_MB + pp.LLAMA_RUNTIME_MB + path.stat().st_size / 2**20 + kv
                continue
        folder = run.merged_dir if name == "merged" else base_dir
        weights = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
        adapter = sum(p.stat().st_size for p in run.adapter_dir.glob("*.safetensors")) / 2**20 if name == "tuned" else 0
        need[name] = pp.TORCH_RUNTIME_MB + min(weights, planner.model_params(config) * 2 / 2**20) + adapter + 256
    available = pp.available_memory_mb()
    too_big = [name for name, mb in need.items() if mb > available * pp.MEMORY_SHARE]
    if too_big:
        fits = [name for name in targets if name not in too_big]
        raise EvalError(", ".join(f"{n} needs about {pp.gib(need[n])}" for n in too_big) + f" of memory and "
                        f"{pp.gib(available)} is available",
                        (f"Evaluate the targets that fit: --targets {','.join(fits)}" if fits else
                         "Export a smaller quantization (appliance export --quant Q4_K_M) and evaluate it")
                        + "; nothing was evaluated.")


def _open(name: str, run: Run, base_dir: Path, items: list[Item], tokenizer: Any) -> Target:
    if name in ("base", "fewshot"):
        return HFTarget(name, base_dir)
    if name == "tuned":
        return HFTarget(name, base_dir, run.adapter_dir)
    longest = max(len(prompt_ids(tokenizer, i.prompt)) for i in items)
    n_ctx = min(8192, 2 * longest + 1024)
    if name == "merged":
        record, exported = run.verification(), _exported(run)
        if compute_device().type == "cpu" and record is not None and record.reference in exported:
            target = GGUFTarget(name, exported[record.reference], n_ctx)  # the gate proved it the merged model
            target.runtime += " (the export's 16-bit reference, equal to the merged model by the gate)"
            return target
        return HFTarget(name, run.merged_dir)
    return GGUFTarget(name, _exported(run)[name[5:]], n_ctx)


def _size(name: str, run: Run, base_dir: Path) -> int | None:
    if name.startswith("gguf:"):
        return _exported(run)[name[5:]].stat().st_size
    folder = run.merged_dir if name == "merged" else base_dir
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _evaluate(target: Target, name: str, conversations: list[list[dict[str, str]]], items: list[Item], task: str,
              labels: list[str], tokenizer: Any, stop_ids: list[int], cfg: EvalConfig, emit: Emitter,
              schema: dict[str, Any] | None = None) -> TargetResult:
    began = time.monotonic()
    prompts = [prompt_ids(tokenizer, c) for c in conversations]
    predictions: list[str] = []
    extra: dict[str, Any] = {}
    report: BaseModel
    if task == "classification" and labels:
        for n, (prompt, conversation) in enumerate(zip(prompts, conversations, strict=True)):
            emit.check_cancelled()
            scores = target.score(prompt, [answer_ids(tokenizer, conversation, label) for label in labels])
            predictions.append(labels[max(range(len(labels)), key=scores.__getitem__)])
            emit.progress(f"evaluating {name}", n + 1, len(items))
        report = metrics.classification_report([i.label or i.reference for i in items], predictions, labels,
                                               resamples=cfg.resamples, seed=cfg.seed)
        per_item = [float(c) for c in report.correct]
    else:
        budget = cfg.max_new_tokens or min(1024, 16 + 2 * max(len(tokenizer.encode(i.reference)) for i in items))
        generated = target.generate(prompts, budget, stop_ids)
        predictions = [tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated]
        if task == "extraction":
            references = [metrics.parse_json_object(i.reference) or {} for i in items]
            extraction = metrics.extraction_report(references, predictions, schema, resamples=cfg.resamples,
                                                   seed=cfg.seed)
            per_item = [float(x) for x in extraction.all_fields_match_items]
            report = extraction
        else:
            qa = metrics.qa_report([i.reference for i in items], predictions, resamples=cfg.resamples, seed=cfg.seed)
            per_item = list(qa.token_f1_items)
            extra["perplexity"] = _perplexity(target, tokenizer, conversations, items)
            report = qa
    primary = PRIMARY.get(task, "token_f1")
    data = report.model_dump()
    return TargetResult(target=name, n=len(items), primary=primary, score=Interval(**data[primary]),
                        report={**data, **extra}, per_item=per_item, size_bytes=None,
                        tokens_per_s=round(target.speed(prompts[0], SPEED_TOKENS), 1),
                        seconds=round(time.monotonic() - began, 1), predictions=predictions,
                        samples=[{"reference": i.reference, "prediction": p}
                                 for i, p in zip(items[:SAMPLES_KEPT], predictions, strict=False)])


def _perplexity(target: Target, tokenizer: Any, conversations: list[list[dict[str, str]]], items: list[Item]) -> float:
    nll = 0.0
    tokens = 0
    for conversation, item in zip(conversations, items, strict=True):
        answer = answer_ids(tokenizer, conversation, item.reference)
        nll -= target.score(prompt_ids(tokenizer, conversation), [answer])[0]
        tokens += len(answer)
    return round(metrics.perplexity(nll, max(tokens, 1)), 4)


def _compare(run: Run, task: str, cfg: EvalConfig, results: list[TargetResult], references: list[str],
             labels: list[str], seconds: float) -> EvalResult:
    by_name = {r.target: r for r in results}
    pairs = [("base", "fewshot"), ("base", "tuned"), ("fewshot", "tuned")]
    pairs += [("tuned", r.target) for r in results if r.target.startswith("gguf:") or r.target == "merged"]
    comparisons = []
    for a, b in pairs:
        if a in by_name and b in by_name:
            comparison = metrics.compare(by_name[a].per_item, by_name[b].per_item, resamples=cfg.resamples,
                                         seed=cfg.seed)
            comparisons.append(_comparison_row(a, b, PRIMARY.get(task, "token_f1"), comparison))
            if task == "classification" and labels:
                f1 = metrics.compare_metric(
                    len(references), metrics.f1_metric(references, by_name[a].predictions, labels),
                    metrics.f1_metric(references, by_name[b].predictions, labels), resamples=cfg.resamples,
                    seed=cfg.seed)
                comparisons.append(_comparison_row(a, b, "macro_f1", f1))
    recommendation, note = _recommend(by_name, cfg.tolerance)
    primary = PRIMARY.get(task, "token_f1")
    table = [TargetRow(target=r.target, score=r.score, macro_f1=r.report.get("macro_f1"), size_bytes=r.size_bytes,
                       tokens_per_s=r.tokens_per_s, seconds=r.seconds) for r in results]
    return EvalResult(run=run.id, task=task, split=cfg.split, n=len(references), primary=primary, targets=table,
                      comparisons=comparisons, recommendation=recommendation, note=note, seconds=seconds)


def _comparison_row(a: str, b: str, metric: str, comparison: metrics.Comparison) -> ComparisonRow:
    sentence = metrics.describe(comparison, a, b)
    return ComparisonRow(baseline=a, target=b, metric=metric, baseline_score=comparison.a, target_score=comparison.b,
                         difference=comparison.difference, significant=comparison.significant,
                         sentence=f"{metric.replace('_', ' ')}: {sentence}")


def _recommend(by_name: dict[str, TargetResult], tolerance: float) -> tuple[Recommendation | None, str | None]:
    """The smallest GGUF whose primary metric stays within `tolerance` points of the fine-tuned model."""
    tuned = by_name.get("tuned")
    quants = [r for name, r in by_name.items() if name.startswith("gguf:") and r.size_bytes]
    if tuned is None or not quants:
        return None, "evaluate the tuned model and at least one exported GGUF to get a recommendation"
    within = [r for r in quants if (r.score.point - tuned.score.point) * 100 >= -tolerance]
    if not within:
        return None, f"no exported quantization stays within {_points(tolerance)} of the fine-tuned model"
    best = min(within, key=lambda r: r.size_bytes or 0)
    difference = round((best.score.point - tuned.score.point) * 100, 2)
    return Recommendation(target=best.target, file=best.target[5:], size_bytes=best.size_bytes or 0,
                          tokens_per_s=best.tokens_per_s, score=best.score.point, difference=difference,
                          reason=f"the smallest file within {_points(tolerance)} of the fine-tuned model "
                          f"({difference:+.1f} points)"), None


def _points(value: float) -> str:
    return f"{value:g} point{'' if value == 1 else 's'}"
