"""The chat session over the real exported model: streaming, history, the context window, cancel,
and which file a run id, an export name or a path stands for."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from conftest import run_cli

from appliance.config import Sampling
from appliance.records import ExportResult
from appliance.run import Run
from appliance.serve.chat import ChatSession, Notice
from appliance.serve.model import ServeError, resolve
from appliance.store import Store

pytestmark = pytest.mark.slow

Exported = tuple[Store, Path, ExportResult]


def _labels(run_dir: Path) -> list[str]:
    return Run.at(run_dir).require_data_report().label_set


@pytest.fixture(scope="module")
def free_session(exported: Exported) -> ChatSession:
    store, run_dir, _ = exported
    return ChatSession.open(resolve(store, run_dir.name, "Q8_0"), Sampling(temperature=0, max_tokens=48),
                            system="You are a helpful assistant.", constrain=False, n_ctx=256)


def test_a_run_id_an_export_name_and_a_path_name_the_same_verified_file(exported: Exported) -> None:
    store, run_dir, result = exported
    by_run = resolve(store, run_dir.name, "Q8_0")
    by_name = resolve(store, result.name, "Q8_0")
    by_path = resolve(store, str(by_run.path))
    assert by_run.path == by_name.path == by_path.path and by_run.path.parent == run_dir / "gguf"
    assert by_run.verified and by_name.verified and by_path.verified
    assert by_run.contract is not None and by_run.labels == _labels(run_dir)
    comparison = Run.at(run_dir).comparison()
    recommended = comparison.recommendation.file if comparison and comparison.recommendation else None
    assert resolve(store, run_dir.name).quant == (recommended or "Q4_K_M")  # the evaluation's pick, else Q4_K_M


def test_a_changed_or_foreign_file_is_not_verified(exported: Exported, tmp_path: Path) -> None:
    store, run_dir, result = exported
    copy = tmp_path / "gguf" / f"{result.name}-Q8_0.gguf"
    copy.parent.mkdir()
    shutil.copy(run_dir / "gguf" / copy.name, copy)
    shutil.copy(Run.at(run_dir).verification_path, copy.parent)
    foreign = resolve(store, str(copy))  # same bytes, but no run manifest vouches for it
    assert not foreign.verified and foreign.contract is not None
    bare = tmp_path / "bare.gguf"
    shutil.copy(copy, bare)
    alone = resolve(store, str(bare))
    assert alone.contract is None and not alone.verified and "did not come out of" in alone.notes[0]
    with pytest.raises(ServeError, match=result.name):  # the error lists what there is
        resolve(store, "no-such-model")


def test_answers_stream_and_are_held_to_the_labels(exported: Exported) -> None:
    store, run_dir, _ = exported
    session = ChatSession.open(resolve(store, run_dir.name, "Q8_0"), Sampling(temperature=0), n_ctx=512)
    row = json.loads((run_dir / "data" / "test.jsonl").read_text().splitlines()[0])
    question = next(m["content"] for m in row["messages"] if m["role"] == "user")
    pieces = list(session.send(question))
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) in _labels(run_dir)  # type: ignore[arg-type]
    assert session.last is not None and session.last.finish_reason == "stop" and not session.last.cancelled
    assert [m["role"] for m in session.messages()] == ["system", "user", "assistant"]
    assert session.messages()[0]["content"] == session.model.contract.system  # type: ignore[union-attr]


def test_oldest_turns_are_dropped_to_fit_the_window_and_said_so(free_session: ChatSession) -> None:
    session = free_session
    session.reset()
    notices: list[str] = []
    for number in range(8):
        for piece in session.send(f"Question {number}: describe a different kind of office printer."):
            if isinstance(piece, Notice):
                notices.append(piece.message)
        if notices:
            break
    assert notices and "oldest exchange" in notices[0] and "256-token context window" in notices[0]
    assert session.last is not None and session.last.dropped_turns >= 1
    assert not session.history[0]["content"].startswith("Question 0:")
    assert session.last.prompt_tokens + min(48, 128) <= 256


def test_cancel_from_another_thread_stops_the_answer_and_keeps_what_was_said(free_session: ChatSession) -> None:
    session = free_session
    session.reset()
    session.sampling = Sampling(temperature=0, max_tokens=120)
    said: list[str] = []
    for piece in session.send("Write a long story about a lighthouse keeper."):
        assert isinstance(piece, str)
        said.append(piece)
        if len(said) == 3:
            canceller = threading.Thread(target=session.cancel)
            canceller.start()
            canceller.join()
    assert session.last is not None and session.last.cancelled and session.last.finish_reason is None
    assert len(said) == 3 and session.history[-1] == {"role": "assistant", "content": "".join(said)}


def test_a_message_larger_than_the_window_is_refused(free_session: ChatSession) -> None:
    with pytest.raises(ServeError, match="context window holds 256"):
        list(free_session.send("printer " * 400))


def test_chat_command_answers_with_a_label(exported: Exported) -> None:
    store, run_dir, result = exported
    out = run_cli("chat", result.name, "--quant", "Q8_0", "--temperature", "0", "--ctx", "512", "-m",
                  "The office printer shows a paper jam error.", "-m", "And the VPN drops every hour.", "--json",
                  store=store.root, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["verified"] is True and data["constrained"] == "labels" and len(data["turns"]) == 2
    assert all(turn["assistant"] in _labels(run_dir) for turn in data["turns"])
