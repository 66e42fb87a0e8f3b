"""`appliance data inspect`: a first look at files (type, convention, columns) and the task and
column mapping they most likely mean, which the TUI's new-run form starts from."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli
from data_helpers import write_jsonl

from appliance.data.inspect import inspect_file, suggest
from appliance.data.sample import shipped_path


def test_the_sample_is_a_classification_table() -> None:
    info = inspect_file(shipped_path())
    assert (info.kind, info.convention, info.rows_sampled, info.error) == ("csv", "table", 200, None)
    assert [c.name for c in info.columns] == ["ticket_id", "text", "category"]
    suggestion = suggest([info])
    assert (suggestion.task, suggestion.text_field, suggestion.label_field) == ("classification", "text", "category")
    assert suggestion.labels == ["access", "billing", "hardware", "network", "security", "software"]
    assert sum(next(c for c in info.columns if c.name == "category").counts.values()) == 200


def test_columns_are_found_by_content_when_names_say_nothing(tmp_path: Path) -> None:
    rows = [{"id": str(i), "body_of_mail": f"message number {i} about the thing that broke " * 2,
             "queue_name": ["a", "b", "c"][i % 3]} for i in range(30)]
    path = write_jsonl(tmp_path / "mail.jsonl", rows)
    suggestion = suggest([inspect_file(path)])
    assert (suggestion.task, suggestion.text_field, suggestion.label_field) == ("classification", "body_of_mail",
                                                                                "queue_name")


def test_json_answers_mean_extraction_and_conversations_mean_chat(tmp_path: Path) -> None:
    table = tmp_path / "invoices.csv"
    table.write_text('text,fields\n"Invoice 7 from ACME, 120 EUR","{""vendor"": ""ACME"", ""total"": 120}"\n'
                     '"Invoice 8 from Bolt, 99 EUR","{""vendor"": ""Bolt"", ""total"": 99}"\n', encoding="utf-8")
    suggestion = suggest([inspect_file(table)])
    assert (suggestion.task, suggestion.text_field, suggestion.output_field) == ("extraction", "text", "fields")
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "hello"}]}])
    info = inspect_file(chats)
    assert info.convention == "openai" and suggest([info]).task == "chat"


def test_unreadable_files_are_reported_per_file_not_raised(tmp_path: Path) -> None:
    semicolons = tmp_path / "semi.csv"
    semicolons.write_text("text;label\nhello;a\n", encoding="utf-8")
    info = inspect_file(semicolons)
    assert info.error is not None and "--delimiter ';'" in info.error
    assert inspect_file(semicolons, delimiter=";").columns[1].name == "label"
    assert inspect_file(tmp_path / "missing.csv").error == "no such file"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok", "label": "a"}\n{not json\n', encoding="utf-8")
    info = inspect_file(broken)
    assert (info.rows_sampled, info.problems, info.error) == (1, 1, None)


def test_examples_never_show_pii(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "write to ana@bank.de please", "label": "a"},
                                              {"text": "Thanks, Sara Rossi", "label": "b"}])
    examples = inspect_file(path).columns[0].examples
    assert examples == ["write to a**@****.** please", "Thanks, S*** *****"]  # names too


def test_cli_prints_the_prepare_command_and_fails_on_a_missing_file(tmp_path: Path) -> None:
    result = run_cli("data", "inspect", str(shipped_path()), "--json", store=tmp_path / "store")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["suggestion"]["task"] == "classification"
    assert out["command"].endswith("--task classification --text-field text --label-field category")
    missing = run_cli("data", "inspect", str(tmp_path / "nope.csv"), store=tmp_path / "store")
    assert missing.returncode == 1 and "nope.csv: no such file" in missing.stdout
