"""Every supported format and task becomes the same conversation schema."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from data_helpers import assert_accounted, run_prepare, split_rows, write_jsonl

from appliance.data.readers import file_kind, record_format
from appliance.store import Store

CHAT = [{"role": "user", "content": "How do I reset my VPN token?"},
        {"role": "assistant", "content": "Open the self-service portal and choose Reset token."}]


def _all_rows(run_dir: Path) -> list[dict]:
    return [r for rows in split_rows(run_dir).values() for r in rows]


def _chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Question number {i} about printers?"},
                          {"role": "assistant", "content": f"Answer {i}: restart the spooler."}]} for i in range(n)]


@pytest.mark.parametrize(("fmt", "rows"), [
    ("openai", _chat_rows(10)),
    ("sharegpt", [{"conversations": [{"from": "system", "value": "Be brief."},
                                     {"from": "human", "value": f"Q{i}?"}, {"from": "gpt", "value": f"A{i}."}]}
                  for i in range(10)]),
    ("alpaca", [{"instruction": f"Summarise ticket {i}", "input": "Printer jam on floor 3", "output": "Jam."}
                for i in range(10)]),
    ("prompt_completion", [{"prompt": f"Ticket {i}: disk full", "completion": "Clean temp files."}
                           for i in range(10)]),
])
def test_chat_formats_are_detected_and_converted(fmt: str, rows: list[dict], tmp_path: Path,
                                                 default_store: Store) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    assert record_format(rows[0]) == fmt
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path])
    assert report["formats"][str(path)] == fmt
    assert_accounted(report)
    out = _all_rows(tmp_path / "run")
    assert len(out) == 10
    for row in out:
        roles = [m["role"] for m in row["messages"]]
        assert roles[-1] == "assistant" and roles[-2] == "user"
        assert row["source"].startswith(str(path))
    if fmt == "alpaca":
        assert any("Printer jam on floor 3" in m["content"] for m in out[0]["messages"])


def test_json_array_and_format_override(tmp_path: Path, default_store: Store) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(_chat_rows(5)))
    assert file_kind(path) == "json"
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path], format="openai")
    assert report["counts"]["rows_read"] == 5 and report["counts"]["invalid"] == 0
    lines = tmp_path / "lines.json"  # JSON lines under a .json name are detected too
    write_jsonl(lines, _chat_rows(3))
    assert file_kind(lines) == "jsonl"


def _tickets(n: int) -> list[dict[str, str]]:
    labels = ["network", "hardware", "access"]
    return [{"id": str(i), "body": f"Ticket {i}: problem number {i * 7} with the {labels[i % 3]} thing",
             "cat": labels[i % 3]} for i in range(n)]


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet"])
def test_tables_become_classification_conversations(kind: str, tmp_path: Path, default_store: Store) -> None:
    rows = _tickets(30)
    path = tmp_path / f"tickets.{kind}"
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["id", "body", "cat"], delimiter="," if kind == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path], task="classification",
                            text_field="body", label_field="cat")
    assert report["labels"]["set"] == ["access", "hardware", "network"]
    assert report["counts"]["rows_read"] == 30 and report["counts"]["invalid"] == 0
    out = split_rows(tmp_path / "run")
    first = out["train"][0]
    assert "access, hardware, network" in first["messages"][0]["content"]  # the prompt lists the labels
    assert first["messages"][-1]["content"] == first["label"]
    dist = report["labels"]["distribution"]
    for split in ("val", "test"):  # stratified: 10 per label, 1 of each in val and test
        assert dist[split] == {"access": 1, "hardware": 1, "network": 1}


def test_label_outside_the_set_is_a_problem(tmp_path: Path, default_store: Store) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "spam"}])
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path], task="classification",
                            labels=["x", "y"], on_error="skip", split=(1.0, 0.0, 0.0))
    problem = report["problems"][0]
    assert problem["line"] == 2 and problem["field"] == "label"
    assert "'spam' is not in the label set" in problem["reason"]
    assert_accounted(report)


def test_extraction_checks_the_schema(tmp_path: Path, default_store: Store) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "amount": {"type": "number"}},
              "required": ["name", "amount"]}
    schema_path = tmp_path / "schema.json"
    schema_path.write_text(json.dumps(schema))
    rows = [{"text": "Invoice from ACME for 120 EUR", "output": {"name": "ACME", "amount": 120}},
            {"text": "Invoice from Initech", "output": '{"name": "Initech"}'},
            {"text": "Bad", "output": "not json"}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path], task="extraction",
                            schema_path=str(schema_path), on_error="skip", split=(1.0, 0.0, 0.0))
    reasons = {p["line"]: p for p in report["problems"]}
    assert "'amount' is a required property" in reasons[2]["reason"]
    assert reasons[3]["field"] == "output" and "not valid JSON" in reasons[3]["reason"]
    kept = split_rows(tmp_path / "run")["train"]
    assert json.loads(kept[0]["messages"][-1]["content"]) == {"name": "ACME", "amount": 120}
    assert '"required"' in kept[0]["messages"][0]["content"]  # the schema is in the prompt


def test_user_template(tmp_path: Path, default_store: Store) -> None:
    template = tmp_path / "t.yaml"
    template.write_text("system: You answer for {{ dept }}.\nuser: '{{ question }}'\nassistant: '{{ answer }}'\n")
    path = write_jsonl(tmp_path / "q.jsonl", [{"dept": "HR", "question": "Leave policy?", "answer": "25 days."},
                                              {"dept": "IT", "question": "VPN?"}])
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path], template_path=str(template),
                            on_error="skip", split=(1.0, 0.0, 0.0))
    assert report["problems"][0]["line"] == 2 and "'answer' is undefined" in report["problems"][0]["reason"]
    kept = split_rows(tmp_path / "run")["train"][0]["messages"]
    assert kept == [{"role": "system", "content": "You answer for HR."},
                    {"role": "user", "content": "Leave policy?"}, {"role": "assistant", "content": "25 days."}]


def test_cleaning(tmp_path: Path, default_store: Store) -> None:
    dirty = "Caf\u0065\u0301 can&#039;t\u200b open\x07 the file.  \r\n\r\n\r\n\r\nIndented:\n    code()  "
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": dirty, "completion": "Try again &amp; report."}])
    run_prepare(tmp_path / "run", default_store.root, [path], split=(1.0, 0.0, 0.0))
    user, answer = split_rows(tmp_path / "run")["train"][0]["messages"]
    assert user["content"] == "Café can't open the file.\n\nIndented:\n    code()"
    assert answer["content"] == "Try again & report."


def test_splits_are_deterministic(tmp_path: Path, default_store: Store) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", _chat_rows(50))
    run_prepare(tmp_path / "a", default_store.root, [path], seed=3)
    run_prepare(tmp_path / "b", default_store.root, [path], seed=3)
    run_prepare(tmp_path / "c", default_store.root, [path], seed=4)
    for name in ("train", "val", "test"):
        a, b = ((tmp_path / d / "data" / f"{name}.jsonl").read_text() for d in ("a", "b"))
        assert a == b
    assert split_rows(tmp_path / "a")["test"] != split_rows(tmp_path / "c")["test"]
    assert [len(v) for v in split_rows(tmp_path / "a").values()] == [40, 5, 5]
