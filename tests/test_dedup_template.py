"""Near-duplicates and contamination are found with real sentence embeddings; the chat template
marks exactly the assistant turns as trained; the shipped sample is what its generator writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import Quickstarted, run_cli
from data_helpers import assert_accounted, run_prepare, split_rows, write_jsonl

from appliance.data import dedup
from appliance.data.lengths import length_stats
from appliance.data.sample import generate, shipped_path, to_csv
from appliance.embedder import Embedder, ensure_onnx
from appliance.run import Run
from appliance.store import Store
from appliance.templating import encode, load_tokenizer

ORIGINALS = [
    "My laptop battery drains completely in less than an hour, even when idle.",
    "The VPN client disconnects every few minutes when I work from home.",
    "I cannot open shared Excel files from the finance drive since the update.",
    "The printer on the third floor keeps jamming on double-sided jobs.",
    "Please create an account for our new intern on the HR portal.",
]
PARAPHRASES = [
    "Even when idle, my laptop's battery drains completely in under an hour.",
    "When I work from home, the VPN client disconnects every few minutes.",
    "Since the update I cannot open shared Excel files from the finance drive.",
]
UNRELATED = [f"Question {i}: how do I {task}?" for i, task in enumerate(
    ["book a meeting room", "request a second monitor", "change my desk phone PIN", "archive old mailboxes",
     "install Python on my workstation", "get access to the staging database", "recover a deleted file",
     "set up an out-of-office reply", "order new business cards", "report a broken chair", "join the guest Wi-Fi",
     "rotate my SSH key", "renew my certificate", "enrol in security training", "export my calendar"])]


def test_near_duplicates_find_planted_paraphrases(default_store: Store) -> None:
    embedder = Embedder(ensure_onnx(default_store.root))
    texts = ORIGINALS + UNRELATED + PARAPHRASES
    emb = embedder.embed(texts)
    assert emb.shape == (len(texts), 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    found = dedup.near_duplicates(emb, threshold=0.9)
    start = len(ORIGINALS) + len(UNRELATED)
    assert {row: partner for row, (partner, _) in found.items()} == {start: 0, start + 1: 1, start + 2: 2}


def test_embeddings_do_not_depend_on_batch_padding(default_store: Store) -> None:
    embedder = Embedder(ensure_onnx(default_store.root))
    alone = embedder.embed(["printer jam"])[0]
    padded = embedder.embed(["printer jam", "a much longer sentence about a printer jam on the third floor today"])[0]
    assert float(alone @ padded) > 0.9999


def test_contamination_is_found_and_moved_to_train(tmp_path: Path, default_store: Store) -> None:
    rows = [{"prompt": t, "completion": "Ticket logged."} for t in ORIGINALS + UNRELATED + PARAPHRASES]
    path = write_jsonl(tmp_path / "tickets.jsonl", rows)
    # near-dup removal off: only the contamination check can catch the paraphrases
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path], near_dup=True, near_dup_threshold=1.0,
                            contamination_threshold=0.9, split=(0.5, 0.25, 0.25), seed=1)
    assert_accounted(report)
    moved = {r["source"].rsplit(":", 1)[1] for r in report["contamination"]["rows"]}
    out = split_rows(tmp_path / "run")
    train_text = {r["messages"][0]["content"] for r in out["train"]}
    eval_text = {r["messages"][0]["content"] for s in ("val", "test") for r in out[s]}
    pairs = list(zip(ORIGINALS[:3], PARAPHRASES, strict=True))
    for original, paraphrase in pairs:
        assert not ({original, paraphrase} & eval_text and {original, paraphrase} & train_text
                    and not {original, paraphrase} <= train_text), "a paraphrase pair straddles train and eval"
    assert report["counts"]["moved_to_train"] == len(moved) >= 1


def test_exact_duplicates_ignore_case_and_spacing(tmp_path: Path, default_store: Store) -> None:
    rows = [{"prompt": "Reset my password", "completion": "Done."},
            {"prompt": "reset   my PASSWORD ", "completion": "done."},
            {"prompt": "Reset my token", "completion": "Done."}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path], split=(1.0, 0.0, 0.0))
    assert report["counts"]["duplicates_exact"] == 1
    assert report["duplicates"]["exact"] == [{"source": f"{path}:2", "duplicate_of": f"{path}:1"}]


def test_only_assistant_turns_are_trained(default_model_dir: Path) -> None:
    tokenizer = load_tokenizer(default_model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"},
                {"role": "assistant", "content": "Rome."}]
    ids, trained = encode(tokenizer, messages)
    assert len(ids) == len(trained)
    trained_text = tokenizer.decode([t for t, keep in zip(ids, trained, strict=True) if keep])
    assert trained_text == "Paris.<|im_end|>Rome.<|im_end|>"  # the answers and their stop, not the newline after
    untrained = tokenizer.decode([t for t, keep in zip(ids, trained, strict=True) if not keep])
    assert "Capital of France?" in untrained and "Paris" not in untrained


def test_length_statistics_on_known_inputs() -> None:
    stats = length_stats([100, 100, 300, 600], [10, 10, 30, 60], max_seq_len=512, batch_size=2, seed=0)
    assert stats["truncated"] == 1 and stats["max"] == 600 and stats["trained_tokens"] == 110
    assert stats["histogram"] == {"64-127": 2, "256-511": 1, "512-1023": 1}
    # packing 512,300,100,100 into 512-token rows: [512], [300,100,100] -> 1012 / 1024
    assert stats["packing_efficiency"] == round(1012 / 1024, 3)
    assert 0 < stats["padding_efficiency"] <= 1


def test_templated_run_reports_lengths(tmp_path: Path, default_store: Store) -> None:
    rows = [{"prompt": f"Ticket {i}: the printer is offline again", "completion": "Restart it."} for i in range(8)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path], templating=True, max_seq_len=256)
    lengths = report["lengths"]
    assert lengths["rows"] == 8 and lengths["truncated"] == 0 and 20 < lengths["p50"] < 80
    assert 0 < lengths["trained_tokens"] < lengths["tokens"]
    assert report["model"] == "smollm2-135m-instruct"


def test_shipped_sample_matches_its_generator() -> None:
    assert shipped_path().read_text(encoding="utf-8") == to_csv(generate())
    rows = generate()
    assert 300 <= len(rows) <= 600 and len({r["category"] for r in rows}) == 6


@pytest.mark.slow
def test_sample_end_to_end_through_the_cli(tmp_path: Path, quickstarted: Quickstarted) -> None:
    """`appliance data sample` writes the shipped sample; what the quickstart prepared from it (through the
    data job, with near-duplicates) accounts for every row, and the data summary says what PII it found."""
    sample = tmp_path / "helpdesk.csv"
    assert run_cli("data", "sample", str(sample)).returncode == 0
    assert sample.read_bytes() == shipped_path().read_bytes()
    run = Run.at(quickstarted.run_dir)
    report = run.require_data_report()
    assert_accounted(report.model_dump(mode="json"))
    assert report.counts.duplicates_exact > 0 and report.counts.duplicates_near > 0
    assert set(report.label_set) == {"access", "billing", "hardware", "network", "security", "software"}
    assert run.config_path.is_file() and run.events_path.is_file()
    for name in ("train", "val", "test"):
        assert report.outputs[name].rows == len(run.split_path(name).read_text().splitlines())
    from rich.console import Console

    from appliance.cli import data as data_cli

    printed = Console(width=200, record=True)
    data_cli.console, original = printed, data_cli.console
    try:
        data_cli.print_data_summary(run.id, report, run.data_dir)
    finally:
        data_cli.console = original
    text = printed.export_text()
    assert "PII found (redact)" in text and "CREDIT_CARD" in text and f"-> {run.data_dir}" in text
