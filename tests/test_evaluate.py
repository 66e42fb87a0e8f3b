"""Evaluation: the same prompts for every target, label scoring that always returns a valid label,
scores that agree between transformers and llama.cpp, few-shot prompts built from training rows,
and the comparison report with its recommendation, on the real fine-tune of the default model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import QUICKSTART_ITEMS, Quickstarted, linked_copy, run_cli

from appliance import toolchain
from appliance.evaluate.items import choose_examples, with_examples
from appliance.records import EvalResult, ExportResult
from appliance.run import Item, Run
from appliance.store import Store

SYSTEM = {"role": "system", "content": "Answer with one word."}


def _item(text: str, answer: str) -> Item:
    return Item(prompt=[SYSTEM, {"role": "user", "content": text}], reference=answer, label=answer)


def test_items_and_few_shot_prompts(tmp_path: Path) -> None:
    run = Run.at(tmp_path / "runs" / "items")
    rows = [{"messages": [SYSTEM, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
             "label": "a1"},
            {"messages": [{"role": "user", "content": "no answer"}]}]
    run.data_dir.mkdir(parents=True)
    run.split_path("test").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = run.items("test")
    assert items == [Item(prompt=[SYSTEM, {"role": "user", "content": "q1"}], reference="a1", label="a1")]
    shots = [_item("printer jams", "hardware"), _item("invoice wrong", "billing")]
    assert with_examples(items[0], shots) == [
        SYSTEM, {"role": "user", "content": "printer jams"}, {"role": "assistant", "content": "hardware"},
        {"role": "user", "content": "invoice wrong"}, {"role": "assistant", "content": "billing"},
        {"role": "user", "content": "q1"}]


def test_similar_examples_are_the_closest_questions(default_store: Store) -> None:
    pool = [_item("The printer on floor 2 keeps jamming paper", "hardware"), _item("I was charged twice", "billing"),
            _item("Cannot log in to the VPN from home", "network"), _item("My password expired", "access")]
    asked = [_item("Paper jam in the printer again", "hardware"), _item("Double charge on my invoice", "billing")]
    chosen = choose_examples(asked, pool, 1, "similar", default_store.root)
    assert [c[0].label for c in chosen] == ["hardware", "billing"]
    first = choose_examples(asked, pool, 2, "random", default_store.root, seed=3)
    assert first == choose_examples(asked, pool, 2, "random", default_store.root, seed=3)  # reproducible
    assert choose_examples(asked, pool, 0, "random", default_store.root) == [[], []]


@pytest.fixture(scope="module")
def tiny_targets(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any]:
    from appliance.evaluate.targets import GGUFTarget, HFTarget
    from appliance.templating import load_tokenizer

    gguf = tmp_path_factory.mktemp("tiny-gguf") / "tiny-F16.gguf"
    toolchain.convert_to_gguf(tiny_model_dir, gguf, "f16")
    hf, llama = HFTarget("hf", tiny_model_dir), GGUFTarget("gguf", gguf, n_ctx=256)
    yield hf, llama, load_tokenizer(tiny_model_dir)
    hf.close()
    llama.close()


def test_cached_label_scores_equal_the_plain_log_likelihood(tiny_targets: tuple[Any, Any, Any]) -> None:
    """Scoring runs the answers as one padded batch over the prompt's cache, and each prompt from the cache
    of what the earlier prompts share; the result must be the log-likelihood a plain forward over prompt +
    answer gives, for every answer, whichever prompts came before (one shares nothing with the others)."""
    import torch

    from appliance.modeling import IGNORE, AnswerScorer, answer_nll
    from appliance.train.data import Encoded, collate

    hf, _llama, tokenizer = tiny_targets
    prompts = [tokenizer.encode(f"<|im_start|>{text}<|im_end|>\n<|im_start|>assistant\n")
               for text in ("user\nWhich team?", "user\nWhich team is it?", "user\nWhich office?", "system\nBe brief.")]
    answers = [[*tokenizer.encode(a), 2] for a in ("billing", "network operations", "hardware")]
    scorer = AnswerScorer(hf.model)
    for prompt in [*prompts, prompts[0]]:
        rows = [Encoded(prompt + a, [IGNORE] * len(prompt) + a) for a in answers]
        with torch.no_grad():
            plain = [-float(x) for x in answer_nll(hf.model, collate(rows, 0))]
        assert scorer.score(prompt, answers) == pytest.approx(plain, abs=1e-4), tokenizer.decode(prompt)
        assert scorer.shared == prompt[:len(scorer.shared)]
    assert scorer.shared == tokenizer.encode("<|im_start|>")  # what all of them share


def test_llama_cpp_scores_agree_with_transformers(tiny_targets: tuple[Any, Any, Any]) -> None:
    hf, llama, tokenizer = tiny_targets
    first = tokenizer.encode("<|im_start|>user\nWhich team?<|im_end|>\n<|im_start|>assistant\n")
    second = tokenizer.encode("<|im_start|>user\nWhich office?<|im_end|>\n<|im_start|>assistant\n")
    answers = [[*tokenizer.encode(a), 2] for a in ("billing", "network operations")]
    for prompt in (first, second, first):  # the second and third reuse part of the cache
        assert llama.score(prompt, answers) == pytest.approx(hf.score(prompt, answers), abs=0.05)
    generated = llama.generate([first], 6, [2])[0]
    assert generated == hf.generate([first], 6, [2])[0][: len(generated)]
    assert llama.speed(first, 8) > 0 and hf.speed(first, 4) > 0


@pytest.mark.slow
def test_eval_compares_every_target(quickstarted: Quickstarted) -> None:
    """The quickstart's evaluation: base zero-shot, few-shot, tuned and every verified GGUF on the same test
    rows, each record complete, every comparison a sentence, the manifest signed again with the results."""
    run = Run.at(quickstarted.run_dir)
    comparison = run.comparison()
    assert comparison is not None
    assert comparison.task == "classification" and comparison.primary == "accuracy" and comparison.n == QUICKSTART_ITEMS
    names = [t.target for t in comparison.targets]
    ggufs = [n for n in names if n.startswith("gguf:")]
    assert names[:3] == ["base", "fewshot", "tuned"] and ggufs and names == names[:3] + ggufs
    labels = run.require_data_report().label_set
    for name in names:
        report = run.evaluation(name)
        assert report is not None and report.target == name
        assert set(report.predictions) <= set(labels) and len(report.predictions) == QUICKSTART_ITEMS  # a valid label
        assert report.report["out_of_set_rate"] == 0.0
        assert sum(map(sum, report.report["confusion"])) == QUICKSTART_ITEMS
        assert 0.0 <= report.score.low <= report.score.point <= report.score.high <= 1.0
        assert report.tokens_per_s > 0 and report.size_bytes
    pairs = {(c.baseline, c.target) for c in comparison.comparisons}
    assert {("base", "fewshot"), ("base", "tuned"), ("fewshot", "tuned")} | {("tuned", g) for g in ggufs} <= pairs
    assert all(c.sentence.endswith(("beyond noise", "within noise")) for c in comparison.comparisons)
    recommendation = comparison.recommendation
    assert recommendation is None or f"gguf:{recommendation.file}" in ggufs
    assert (recommendation is None) == (comparison.note is not None)
    manifest = run.manifest()
    assert manifest is not None and set(manifest.evaluation or {}) >= {"base", "tuned", "comparison"}
    assert run_cli("verify", run.id, store=quickstarted.store.root).returncode == 0
    assert not math.isnan(comparison.seconds)


@pytest.mark.slow
def test_the_merged_target_on_the_cpu_is_the_verified_16_bit_gguf(exported: tuple[Store, Path, ExportResult]) -> None:
    """On a CPU the merged model is asked through the export's 16-bit GGUF, which the gate proved equal to it,
    instead of a float32 copy of the model; the target's record says what ran it. (On a copy of the session's
    exported run: the weights are linked, everything a job writes is copied.)"""
    store, run_dir, result = exported
    copy = linked_copy(run_dir, "merged-target")
    try:
        evaluated = run_cli("eval", "--run", copy.name, "--targets", "merged", "--max-items", "4", "--json",
                            store=store.root)
        assert evaluated.returncode == 0, evaluated.stderr
        merged = Run.at(copy).evaluation("merged")
        assert merged is not None and merged.n == 4
        assert merged.runtime == f"llama.cpp, {result.files[0].file} (the export's 16-bit reference, equal to the " \
                                 "merged model by the gate)"
        assert result.files[0].quant == "F16"
    finally:
        shutil.rmtree(copy)


@pytest.mark.slow
def test_eval_command_scores_the_targets_it_is_given(trained: tuple[Store, Path]) -> None:
    store, source = trained
    run_dir = linked_copy(source, "eval-command")  # the quickstart's own evaluation stays as it was
    try:
        result = run_cli("eval", "--run", run_dir.name, "--targets", "tuned", "--max-items", "6", "--split", "val",
                         "--json", store=store.root)
        assert result.returncode == 0, result.stderr
        summary = EvalResult.model_validate_json(result.stdout)
        assert summary.split == "val" and summary.n == 6 and [t.target for t in summary.targets] == ["tuned"]
        assert summary.note and Run.at(run_dir).comparison() == summary  # what it printed is what it recorded
        assert Run.at(run_dir).settings("eval")["targets"] == ["tuned"]  # recorded, as every front end records it
        tuned = Run.at(run_dir).evaluation("tuned")
        assert tuned is not None and tuned.runtime == "transformers, float32 on cpu"  # a small model: exact and fast
        refused = run_cli("eval", "--run", run_dir.name, "--targets", "gguf:Q2_K", store=store.root)
        assert refused.returncode == 1 and "has no verified Q2_K GGUF" in refused.stderr
    finally:
        shutil.rmtree(run_dir)


@pytest.mark.slow
def test_training_reports_the_task_metric(trained: tuple[Store, Path]) -> None:
    """A classification run's training measures label accuracy on validation rows at each evaluation."""
    from appliance import events as ev

    _store, run_dir = trained
    events = ev.read_all(run_dir / ev.EVENTS_FILE)
    accuracy = [e for e in events if isinstance(e, ev.Metric) and e.name == "eval_accuracy"]
    losses = [e for e in events if isinstance(e, ev.Metric) and e.name == "eval_loss"]
    assert [e.step for e in accuracy] == [e.step for e in losses] == [8]  # TRAIN_SETTINGS: evaluated at the end
    assert all(0.0 <= e.value <= 1.0 for e in accuracy)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["extraction", "chat"])
def test_generation_tasks_are_scored(task: str, scratch_store: Store, tmp_path: Path) -> None:
    """Extraction (JSON validity, the run's own schema, field matches) and chat (token F1, perplexity of the
    references) go through generation: the base model answers four held-out rows."""
    from data_helpers import run_prepare, write_jsonl

    from appliance import events as ev
    from appliance.config import EvalConfig
    from appliance.evaluate import run as evaluate

    companies = ["ACME", "Initech", "Globex", "Umbrella", "Hooli", "Stark", "Wayne", "Wonka", "Tyrell", "Cyberdyne"]
    options: dict[str, Any] = {"split": (0.6, 0.0, 0.4), "templating": True}
    if task == "extraction":
        schema = {"type": "object", "properties": {"name": {"type": "string"}, "amount": {"type": "number"}},
                  "required": ["name", "amount"]}
        (tmp_path / "schema.json").write_text(json.dumps(schema))
        rows: list[Any] = [{"text": f"Invoice from {c} for {100 + 7 * i} EUR",
                            "output": {"name": c, "amount": 100 + 7 * i}} for i, c in enumerate(companies)]
        options.update(task="extraction", schema_path=str(tmp_path / "schema.json"))
    else:
        rows = [{"messages": [{"role": "user", "content": f"Who sent invoice {i}?"},
                              {"role": "assistant", "content": f"{c} sent it."}]} for i, c in enumerate(companies)]
    run_dir = scratch_store.runs_dir / f"eval-{task}"
    run_prepare(run_dir, scratch_store.root, [write_jsonl(tmp_path / "rows.jsonl", rows)], **options)
    cfg = EvalConfig(targets=["base"], max_new_tokens=40, resamples=200, store=str(scratch_store.root))
    summary = evaluate.run(cfg, run_dir, ev.Emitter(lambda event: None))
    saved = json.loads((run_dir / "eval" / "base.json").read_text())
    assert summary.task == task and summary.n == 4 and len(saved["predictions"]) == 4
    if task == "extraction":
        assert summary.primary == "all_fields_match" and (run_dir / "data" / "schema.json").is_file()
        report = saved["report"]
        assert report["schema_valid"] is not None and 0.0 <= report["json_valid"]["point"] <= 1.0
        assert set(report["fields"]) == {"name", "amount"}
    else:
        assert summary.primary == "token_f1" and saved["report"]["perplexity"] > 1.0
        assert all(isinstance(p, str) for p in saved["predictions"])
