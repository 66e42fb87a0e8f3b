"""Pieces of chat and serve that need no model: grammars, the loopback rule, reading streamed
answers back for the audit log, redaction of logged prompts, the systemd unit."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from appliance.config import ServeConfig, is_loopback
from appliance.pii import Redactor
from appliance.serve.audit import AuditLog, redacted_messages
from appliance.serve.model import ServedModel, grammar
from appliance.serve.server import Outcome
from appliance.templating import ChatContract


def _model(task: str, labels: list[str] | None = None, schema: dict[str, Any] | None = None) -> ServedModel:
    contract = ChatContract(template="{{ messages }}", eos_token="</s>", eos_id=2, bos_token=None, bos_id=None,
                            stop_tokens=["</s>"], stop_ids=[2], turns=None, generation_prompt=None,
                            default_system=None, system=None, task=task, labels=labels)
    return ServedModel(path=Path("m.gguf"), name="m", sha256="0" * 64, contract=contract, schema=schema)


def test_label_grammar_matches_exactly_the_labels_even_with_odd_characters() -> None:
    from llama_cpp import LlamaGrammar

    labels = ['say "hi"', "back\\slash", "two\nlines", "ünïcode", "plain"]
    text, kind = grammar(_model("classification", labels)) or ("", "")
    assert kind == "labels"
    LlamaGrammar.from_string(text, verbose=False)  # llama.cpp parses it
    assert text.count(" | ") == len(labels) - 1
    assert r'"say \"hi\""' in text and r'"back\\slash"' in text and r'"two\nlines"' in text


def test_schema_grammar_for_extraction_and_none_for_chat() -> None:
    from llama_cpp import LlamaGrammar

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "amount": {"type": "number"}},
              "required": ["name", "amount"]}
    text, kind = grammar(_model("extraction", schema=schema)) or ("", "")
    assert kind == "json-schema" and "amount" in text
    LlamaGrammar.from_string(text, verbose=False)
    assert grammar(_model("chat")) is None
    assert grammar(_model("extraction")) is None  # no schema recorded: nothing to hold it to


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.0.0.53", True), ("::1", True),
                                                ("localhost", True), ("0.0.0.0", False), ("::", False),
                                                ("192.168.1.20", False), ("example.internal", False)])
def test_only_loopback_listens_without_a_key(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    if loopback:
        ServeConfig(model="m", host=host, store="/tmp/s")
    else:
        with pytest.raises(ValidationError, match="without an API key"):
            ServeConfig(model="m", host=host, store="/tmp/s")
        ServeConfig(model="m", host=host, api_key="k" * 16, store="/tmp/s")
    with pytest.raises(ValidationError):
        ServeConfig(model="m", api_key="short", store="/tmp/s")  # a guessable key is refused


async def _stream_through(outcome: Outcome, raw: bytes, size: int) -> bytes:
    """Send `raw` as an event-stream response in pieces of `size` bytes; what reached the client."""
    sent: list[bytes] = []

    async def send(message: Any) -> None:
        sent.append(message.get("body", b""))

    wrapped = outcome.wrap(send)
    await wrapped({"type": "http.response.start", "status": 200,
                   "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
    for start in range(0, len(raw), size):
        await wrapped({"type": "http.response.body", "body": raw[start:start + size], "more_body": True})
    return b"".join(sent)


def test_a_streamed_answer_is_read_back_however_the_bytes_are_split() -> None:
    events = [{"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]},
              {"choices": [{"delta": {"content": "bill"}, "finish_reason": None}]},
              {"choices": [{"delta": {"content": "ing ✓"}, "finish_reason": None}]},
              {"choices": [{"delta": {}, "finish_reason": "stop"}]}]
    wire = "".join(f"data: {json.dumps(e, ensure_ascii=False)}\r\n\r\n" for e in events) + "data: [DONE]\r\n\r\n"
    raw = wire.encode("utf-8")
    for size in (1, 7, 64, len(raw)):
        outcome = Outcome()
        assert asyncio.run(_stream_through(outcome, raw, size)) == raw  # passed through untouched
        assert outcome.answer() == "billing ✓" and outcome.finish_reason == "stop" and outcome.status == 200


def test_logged_prompts_keep_no_raw_pii_and_placeholders_are_stable(tmp_path: Path) -> None:
    redactor = Redactor()
    parts = [{"type": "text", "text": "Mail ann@corp.example or "},
             {"type": "text", "text": "ann@corp.example, IBAN DE89370400440532013000. Thanks, Sara Rossi"}]
    messages = [{"role": "user", "content": parts}]
    clean = redacted_messages(messages, redactor)
    assert clean == [{"role": "user", "content": "Mail <EMAIL_1> or <EMAIL_1>, IBAN <IBAN_1>. Thanks, <PERSON_1>"}]
    log = AuditLog(tmp_path / "audit" / "serve.jsonl", log_prompts=True)
    log.write({"prompt": clean})
    log.close()
    assert (tmp_path / "audit" / "serve.jsonl").stat().st_mode & 0o777 == 0o600


def test_the_systemd_unit_keeps_the_key_out(tmp_path: Path) -> None:
    from appliance.endpoint import systemd_unit

    key_file = tmp_path / "key"
    cfg = ServeConfig(model="run-1", host="0.0.0.0", api_key="s3cret-" * 4, store=str(tmp_path))
    unit = systemd_unit(cfg, key_file)
    assert "s3cret" not in unit and f"--api-key-file {key_file}" in unit and "KillSignal=SIGTERM" in unit
    from_env = systemd_unit(cfg, None)
    assert "s3cret" not in from_env and "EnvironmentFile=" in from_env


def test_request_bodies_are_read_as_json_schema_reads_them() -> None:
    """Whole numbers are integers however written; what is not JSON (NaN, overflowing numbers, lone
    surrogates), too deeply nested or not an object is a 400; fields are checked strictly."""
    from appliance.serve.checks import Rejection, parse, request_models, validate

    assert parse(b'{"max_tokens": 5.0, "top_p": 0.5, "seed": 1e3}') == {"max_tokens": 5, "top_p": 0.5, "seed": 1000}
    for body, fragment in [(b'{"temperature": NaN}', "NaN"), (b'{"top_p": -Infinity}', "Infinity"),
                           (b'{"top_p": 1e999}', "too large"), (b'{"input": "\\ud800"}', "surrogate"),
                           (b"[" * 5000 + b"]" * 5000, "nested"), (b"[1]", "JSON object"),
                           (b"\xff\xfe{", "not valid JSON")]:
        with pytest.raises(Rejection, match=fragment) as excinfo:
            parse(body)
        assert excinfo.value.status == 400
    chat = request_models()["/v1/chat/completions"]
    hello = [{"role": "user", "content": "hi"}]
    validate(chat, {"messages": hello, "temperature": 1, "max_tokens": 5, "unknown": {"fields": "pass"}})
    for wrong in ({"max_tokens": "5"}, {"max_tokens": True}, {"stream": "true"}, {"top_p": 3}, {"messages": "hi"}):
        with pytest.raises(Rejection) as excinfo:
            validate(chat, {"messages": hello, **wrong})
        assert (excinfo.value.status, excinfo.value.code, excinfo.value.param) == (400, "invalid_body",
                                                                                 next(iter(wrong)))


def test_what_the_schema_cannot_say_is_checked_before_the_runtime() -> None:
    from appliance.serve.checks import Rejection, check_logit_bias, check_prompt, check_tokens, forced_tool, is_json

    assert is_json(b"application/json; charset=utf-8") and is_json(b"application/merge-patch+json")
    assert not any(is_json(t) for t in (None, b"", b"text/plain", b"application/x-www-form-urlencoded"))
    request: dict[str, Any] = {"prompt": ["one"]}
    check_prompt(request)
    assert request == {"prompt": "one"}  # llama-cpp-python takes a list for token ids
    check_tokens([0, 99], 100, "tokens")
    check_logit_bias({"logit_bias": {"7": 2.0}}, 100)
    check_logit_bias({"logit_bias": {"hello": 2.0}, "logit_bias_type": "tokens"}, 100)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert forced_tool({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}}}) == tools[0]
    assert forced_tool({"tools": tools, "tool_choice": "auto"}) is None
    refused = [lambda: check_prompt({"prompt": ["a", "b"]}), lambda: check_prompt({"prompt": []}),
               lambda: check_tokens([5, -1], 100, "tokens"), lambda: check_tokens([100], 100, "tokens"),
               lambda: check_logit_bias({"logit_bias": {"hello": 1}}, 100),
               lambda: check_logit_bias({"logit_bias": {"100": 1}}, 100),
               lambda: forced_tool({"functions": [tools[0]["function"]], "function_call": {"name": "g"}})]
    for call in refused:
        with pytest.raises(Rejection) as excinfo:
            call()
        assert excinfo.value.status == 400


def test_an_audit_record_is_one_line_whatever_the_text_holds(tmp_path: Path) -> None:
    """A model's answer can hold characters that JSON leaves raw but line readers split on (U+2028, U+0085):
    they are escaped, so every record reads back as one line."""
    log = AuditLog(tmp_path / "audit.jsonl")
    record = {"answer": "a\u2028b\u2029c\x85d\u00e9", "path": "/v1/completions"}
    log.write(record)
    log.close()
    lines = (tmp_path / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == record and "\u00e9" in lines[0]
