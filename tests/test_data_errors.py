"""A corpus of bad files: each gets a precise problem (file, line, field, reason), and the counts
always add up. With --on-error fail nothing is written but the list of problems."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import assert_accounted, run_prepare, write_jsonl

from appliance.data.prepare import DataError
from appliance.store import Store

GOOD = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


def _problems(report: dict) -> dict[int, dict]:
    return {p["line"]: p for p in report["problems"]}


def test_bad_rows_in_one_file(tmp_path: Path, default_store: Store) -> None:
    lines = [
        json.dumps(GOOD),                                                                  # 1 ok
        '{"messages": [{"role": "user", "content": "cut off',                              # 2 truncated
        json.dumps({"messages": [{"role": "user", "content": 123},
                                 {"role": "assistant", "content": "x"}]}),                 # 3 wrong type
        json.dumps({"messages": [{"content": "no role"}, {"role": "assistant", "content": "x"}]}),  # 4
        json.dumps({"messages": [{"role": "wizard", "content": "?"}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),       # 8 no answer
        json.dumps([1, 2, 3]),                                                             # 9 not an object
        json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}),  # 10
        "",                                                                                # blank: ignored
        json.dumps(GOOD).replace("Hi?", "Hi again?"),                                      # 12 ok
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path], on_error="skip", split=(1.0, 0.0, 0.0))
    p = _problems(report)
    assert all(problem["file"] == str(path) for problem in p.values())
    assert "broken JSON" in p[2]["reason"] and "column" in p[2]["reason"]
    assert p[3]["field"] == "messages[0].content" and "must be text, got int" in p[3]["reason"]
    assert p[4]["field"] == "messages[0].role" and "missing" in p[4]["reason"]
    assert p[5]["field"] == "messages[0].role" and "unknown role 'wizard'" in p[5]["reason"]
    assert p[6]["field"] == "messages[0].content" and "is empty" in p[6]["reason"]
    assert p[7]["field"] == "messages[0].role" and "expected user, got assistant" in p[7]["reason"]
    assert p[8]["field"] == "messages" and "end with an assistant turn" in p[8]["reason"]
    assert "expected a JSON object, got a list" in p[9]["reason"]
    assert "sharegpt but the file is openai (from line 1)" in p[10]["reason"]  # mixed formats
    assert report["counts"]["rows_read"] == 11 and report["counts"]["invalid"] == 9
    assert report["counts"]["train"] == 2
    assert_accounted(report)


def test_on_error_fail_lists_everything_and_writes_no_splits(tmp_path: Path, default_store: Store) -> None:
    path = tmp_path / "two-bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{broken\n" + json.dumps({"messages": []}) + "\n")
    with pytest.raises(DataError) as excinfo:
        run_prepare(tmp_path / "run", default_store.root, [path])
    message = excinfo.value.message
    assert "2 of 3 rows have problems" in message
    assert f"{path}:2: broken JSON" in message and f"{path}:3: messages: is empty" in message
    assert "--on-error skip" in excinfo.value.hint
    assert not (tmp_path / "run" / "data").exists()
    listed = [json.loads(line) for line in (tmp_path / "run" / "data_problems.jsonl").read_text().splitlines()]
    assert [r["line"] for r in listed] == [2, 3]


def test_empty_file(tmp_path: Path, default_store: Store) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    report, _ = run_prepare(tmp_path / "run", default_store.root, [empty, good], on_error="skip",
                            split=(1.0, 0.0, 0.0))
    assert report["file_problems"] == [{"file": str(empty), "line": 0, "field": "", "reason": "the file is empty"}]
    assert report["counts"]["rows_read"] == 1
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n  \n")
    with pytest.raises(DataError, match="the file has no rows"):
        run_prepare(tmp_path / "run2", default_store.root, [blank])


def test_ten_megabyte_line(tmp_path: Path, default_store: Store) -> None:
    path = tmp_path / "huge.jsonl"
    huge = json.dumps({"prompt": "x" * (10 * 1024 * 1024), "completion": "y"})
    path.write_text(json.dumps(GOOD) + "\n" + huge + "\n" + json.dumps(GOOD).replace("Hi", "Yo") + "\n")
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path], on_error="skip", split=(1.0, 0.0, 0.0))
    p = _problems(report)
    assert "10.0 MiB, over the 4 MiB limit" in p[2]["reason"]
    assert report["counts"]["train"] == 2  # the row after the giant one is read normally
    assert_accounted(report)


def test_invalid_utf8_and_bom(tmp_path: Path, default_store: Store) -> None:
    path = tmp_path / "enc.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n"
                     + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path], on_error="skip", split=(1.0, 0.0, 0.0))
    p = _problems(report)
    assert 1 not in p  # the BOM is not a problem
    assert "invalid UTF-8 at byte 15" in p[2]["reason"]
    csv_path = tmp_path / "enc.csv"
    csv_path.write_bytes(b"\xef\xbb\xbftext,label\nfine,a\nbad \xff byte,b\n")
    report, _ = run_prepare(tmp_path / "run2", default_store.root, [csv_path], task="classification",
                            on_error="skip", split=(1.0, 0.0, 0.0))
    p = _problems(report)
    assert p[3]["field"] == "text" and "invalid UTF-8" in p[3]["reason"]
    assert report["counts"]["train"] == 1  # row 2 found its "text" column: the BOM did not stick to it


def test_csv_with_the_wrong_delimiter(tmp_path: Path, default_store: Store) -> None:
    path = tmp_path / "semi.csv"
    path.write_text("text;label\nprinter broken;hardware\n")
    with pytest.raises(DataError) as excinfo:
        run_prepare(tmp_path / "run", default_store.root, [path], task="classification", labels=["hardware"])
    assert "looks ;-delimited; pass --delimiter ';'" in excinfo.value.message
    report, _ = run_prepare(tmp_path / "run2", default_store.root, [path], task="classification",
                            labels=["hardware"], delimiter=";", split=(1.0, 0.0, 0.0))
    assert report["counts"]["train"] == 1


def test_ragged_csv_rows(tmp_path: Path, default_store: Store) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text('text,label\n"ok, quoted",a\ntoo,many,cells\n')
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path], task="classification", on_error="skip",
                            split=(1.0, 0.0, 0.0))
    assert _problems(report)[3]["reason"] == "row has 3 columns, the header has 2"


def test_too_long_after_templating(tmp_path: Path, default_store: Store) -> None:
    rows = [{"prompt": "Hi?", "completion": "Hello."}, {"prompt": "word " * 400, "completion": "ok"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(DataError, match="tokens after templating, over --max-seq-len 128"):
        run_prepare(tmp_path / "run", default_store.root, [path], templating=True, max_seq_len=128)
    report, _ = run_prepare(tmp_path / "run2", default_store.root, [path], templating=True, max_seq_len=128,
                            truncate=True, split=(1.0, 0.0, 0.0), on_error="skip")
    assert report["lengths"]["truncated"] == 1 and report["counts"]["train"] == 2


def test_every_skipped_row_is_listed(tmp_path: Path, default_store: Store) -> None:
    path = tmp_path / "many.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + "{bad\n" * 50)
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path], on_error="skip", split=(1.0, 0.0, 0.0))
    listed = (tmp_path / "run" / "data" / "problems.jsonl").read_text().splitlines()
    assert len(listed) == report["counts"]["invalid"] == report["outputs"]["problems"]["rows"] == 50
    assert [json.loads(line)["line"] for line in listed] == list(range(2, 52))
