"""The endpoint under hostile input and sustained load, on loopback: schemathesis against the schema
it publishes, a burst of malformed, oversized, slow and unauthorised requests, and a stretch of
steady traffic with the server's memory watched.

All three talk to one server on the exported run of the test session (the `exported` fixture), a
classification model, rather than the base GGUF: it is what the appliance serves, and its contract
drives the code the guard adds in front of llama-cpp-python (the training system prompt put in
front of chats, the label grammar held over answers unless a request brings its own grammar,
response_format or tools), which a bare GGUF leaves idle. Its answers are labels of a few tokens,
so generation stays cheap on the CPU. The server's limits are tight so that each one is reached:
max_tokens 8, a 512-token context, 16 KiB bodies, a 2 s body timeout, 2 requests waiting.

APPLIANCE_FUZZ_EXAMPLES (default 10) sets schemathesis's examples per operation, and
APPLIANCE_LOAD_SECONDS (default 30) the length of the load test, for longer runs by hand.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from serve_helpers import KEY, Server, key_file

from appliance.records import ExportResult
from appliance.run import Run
from appliance.store import Store

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_TOKENS, CTX, BODY_KB, BODY_TIMEOUT_S, QUEUE = 8, 512, 16, 2, 2
EXAMPLES = int(os.environ.get("APPLIANCE_FUZZ_EXAMPLES", "10"))
LOAD_SECONDS = float(os.environ.get("APPLIANCE_LOAD_SECONDS", "30"))
QUESTIONS = ["The printer on floor 3 jams on every job.", "I cannot log in to the HR portal since Monday.",
             "The VPN disconnects every hour from home.", "I was charged twice for the same licence."]


@dataclass
class Endpoint:
    server: Server
    labels: list[str]
    sent: Counter[str] = field(default_factory=Counter)  # requests each test sent, for the summary

    def audit_lines(self) -> int:
        return len(self.server.audit.read_text(encoding="utf-8").splitlines())

    def wait_for_audit(self, lines: int, timeout: float = 15) -> list[dict[str, Any]]:
        """The audit records once there are `lines` of them (a line is written just after its answer)."""
        deadline = time.monotonic() + timeout
        while self.audit_lines() < lines and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.server.records()


@pytest.fixture(scope="module")
def endpoint(exported: tuple[Store, Path, ExportResult], tmp_path_factory: pytest.TempPathFactory) \
        -> Iterator[Endpoint]:
    store, run_dir, _ = exported
    folder = tmp_path_factory.mktemp("hardening")
    # one thread: llama.cpp's threads wait for each other at every step, and on a machine busy with other
    # work a second thread that is not scheduled stalls generation many times over
    server = Server(store, [run_dir.name, "--quant", "Q8_0", "--api-key-file", str(key_file(folder)), "--threads", "1",
                            "--ctx", str(CTX), "--max-tokens", str(MAX_TOKENS), "--max-queue", str(QUEUE),
                            "--max-body-kb", str(BODY_KB), "--body-timeout", str(BODY_TIMEOUT_S), "--log-prompts"],
                    folder / "audit.jsonl")
    target = Endpoint(server, Run.at(run_dir).require_data_report().label_set)
    yield target
    assert server.stop() == 0
    print(f"\nrequests sent: {dict(target.sent)}")
    # the key travelled in every request, and in some wrong ones with it as a prefix: it is in no log
    assert KEY not in server.audit.read_text(encoding="utf-8"), "the API key is in the audit log"
    assert KEY not in server.output(), "the API key is in the server's output"


# -- schemathesis against the published schema ---------------------------------------------------

# Refusals a request the schema allows may still get: the schema cannot know the context window,
# which grammars llama.cpp parses, which texts this vocabulary's tokens spell, what the chat template
# renders, or whether a forced tool is among those sent
SEMANTIC_REFUSALS = {"context_length_exceeded", "invalid_grammar", "invalid_logit_bias", "partial_character",
                     "invalid_messages", "unknown_tool"}


@schemathesis.check
def schema_valid_requests_pass_the_guard(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                                         case: schemathesis.Case) -> bool | None:
    """Stands in for positive_data_acceptance, which wants every schema-valid request answered 2xx:
    a valid request may rightly get one of the SEMANTIC_REFUSALS, but never a refusal of its shape
    (then the published schema and the guard's checks disagree)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    code = response.json()["error"]["code"]
    assert code in SEMANTIC_REFUSALS, f"a request the published schema allows was refused: {response.text}"
    return None


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection, schema_valid_requests_pass_the_guard,
          missing_required_header, ignored_auth, unsupported_method]


@pytest.fixture(scope="module")
def published_schema(endpoint: Endpoint) -> schemathesis.BaseSchema:
    """The schema as the server publishes it (behind the key, like every route but /health)."""
    assert httpx.get(f"{endpoint.server.url}/openapi.json").status_code == 401
    config = schemathesis.Config.from_dict({
        "auth": {"openapi": {"HTTPBearer": {"bearer": KEY}}},
        "request-timeout": 60,
        "generation": {"max-examples": EXAMPLES, "deterministic": True, "database": "none"},
        "checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 404, 405, 413, 415]}},
    })
    return schemathesis.openapi.from_url(f"{endpoint.server.url}/openapi.json", config=config, headers=AUTH,
                                         timeout=30)


schema = schemathesis.pytest.from_fixture("published_schema")


@schema.parametrize()
def test_generated_requests_get_no_5xx_and_answers_match_the_schema(case: schemathesis.Case,
                                                                   endpoint: Endpoint) -> None:
    """Every operation, with bodies generated from the schema and mutated out of it. max_tokens is
    bounded by the schema itself (1 to the server's cap), so generation stays short."""
    endpoint.sent["schemathesis"] += 1
    case.call_and_validate(checks=CHECKS)


# -- a burst of hostile requests -----------------------------------------------------------------

@dataclass
class Probe:
    name: str
    expected: set[int]
    send: Callable[[httpx.Client], int | None]  # the status that came back; None when none can
    audited: bool = True  # False: never an HTTP request the app sees (broken framing), so no audit line


def _post(path: str, body: bytes | dict[str, Any] | list[Any], headers: dict[str, str] | None = None,
          content_type: str | None = "application/json") -> Callable[[httpx.Client], int | None]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
    sent = {**AUTH, **({"content-type": content_type} if content_type else {}), **(headers or {})}
    return lambda client: client.post(path, content=data, headers=sent).status_code


def _get(path: str, headers: dict[str, str] | None = None) -> Callable[[httpx.Client], int | None]:
    return lambda client: client.get(path, headers=AUTH if headers is None else headers).status_code


def _chunked(size: int) -> Callable[[httpx.Client], int | None]:
    """A body over the limit with no Content-Length: counted as it arrives."""
    def pieces() -> Iterator[bytes]:
        for _ in range(size // 4096):
            yield b" " * 4096

    headers = {**AUTH, "content-type": "application/json"}
    return lambda client: client.post("/v1/chat/completions", content=pieces(), headers=headers).status_code


def _raw(port: int, data: bytes, close_early: bool = False) -> Callable[[httpx.Client], int | None]:
    """Bytes on a bare socket: for bodies that stop arriving, and for requests that are not HTTP."""
    def send(_: httpx.Client) -> int | None:
        with socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT_S + 20) as sock:
            sock.sendall(data)
            if close_early:
                return None
            reply = b""
            while b"\r\n" not in reply:
                piece = sock.recv(4096)
                if not piece:
                    return None
                reply += piece
            return int(reply.split(b" ", 2)[1])

    return send


def _partial(port: int, declared: int, sent: bytes) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n").encode() + sent


def _probes(port: int) -> list[Probe]:
    chat = {"messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 4}
    ok = {200, 429}  # a valid generation is answered, or turned away while the queue is full
    bad = {400}
    return [
        Probe("valid chat", ok, _post("/v1/chat/completions", chat)),
        Probe("valid completion", ok, _post("/v1/completions", {"prompt": "The printer", "max_tokens": 3})),
        Probe("valid streamed chat", ok, _post("/v1/chat/completions", {**chat, "stream": True})),
        Probe("unknown fields", ok, _post("/v1/chat/completions", {**chat, "frobnicate": {"x": [1]}})),
        Probe("lowercase scheme", ok, _post("/v1/chat/completions", chat,
                                            {"Authorization": f"bearer {KEY}"})),
        Probe("tokenize", {200}, _post("/extras/tokenize", {"input": "hello"})),
        Probe("models", {200}, _get("/v1/models")),
        Probe("schema", {200}, _get("/openapi.json")),
        Probe("truncated JSON", bad, _post("/v1/chat/completions", b'{"messages": [{"role": "us')),
        Probe("not JSON", bad, _post("/v1/completions", b"\xff\xfe garbage \x00")),
        Probe("JSON array", bad, _post("/v1/chat/completions", [chat])),
        Probe("JSON string", bad, _post("/v1/completions", "prompt")),
        Probe("JSON null", bad, _post("/extras/tokenize", b"null")),
        Probe("deep nesting", bad, _post("/v1/chat/completions", b"[" * 6000 + b"]" * 6000)),
        Probe("NaN temperature", bad, _post("/v1/chat/completions", json.dumps(chat)[:-1].encode()
                                            + b', "temperature": NaN}')),
        Probe("overflowing number", bad, _post("/v1/completions", b'{"prompt": "a", "top_p": 1e999}')),
        Probe("lone surrogate", bad, _post("/extras/tokenize", b'{"input": "\\ud800"}')),
        Probe("text/plain", {415}, _post("/v1/chat/completions", chat, content_type="text/plain")),
        Probe("form", {415}, _post("/v1/chat/completions", b"messages=hi",
                                   content_type="application/x-www-form-urlencoded")),
        Probe("no content type", {415}, _post("/extras/tokenize", {"input": "x"}, content_type=None)),
        Probe("huge body", {413}, _post("/v1/chat/completions", b"{" + b" " * (BODY_KB * 1024 + 10) + b"}")),
        Probe("huge chunked body", {413}, _chunked(4 * BODY_KB * 1024)),
        Probe("huge max_tokens", bad, _post("/v1/chat/completions", {**chat, "max_tokens": 10**12})),
        Probe("negative max_tokens", bad, _post("/v1/completions", {"prompt": "a", "max_tokens": -5})),
        Probe("max_tokens as text", bad, _post("/v1/chat/completions", {**chat, "max_tokens": "4"})),
        Probe("max_tokens true", bad, _post("/v1/chat/completions", {**chat, "max_completion_tokens": True,
                                                                     "max_tokens": None})),
        Probe("absurd top_p", bad, _post("/v1/chat/completions", {**chat, "top_p": 50})),
        Probe("negative top_k", bad, _post("/v1/completions", {"prompt": "a", "top_k": -1})),
        Probe("bad role", bad, _post("/v1/chat/completions", {"messages": [{"role": "root", "content": "x"}]})),
        Probe("no messages", bad, _post("/v1/chat/completions", {"messages": []})),
        Probe("batch of prompts", bad, _post("/v1/completions", {"prompt": ["a", "b"]})),
        Probe("empty prompt", bad, _post("/v1/completions", {"prompt": ""})),
        Probe("prompt over the context", bad, _post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "ticket " * 1500}]})),
        Probe("broken grammar", bad, _post("/v1/completions", {"prompt": "a", "grammar": "root ::= ("})),
        Probe("quote in a schema's property", bad, _post("/v1/chat/completions", {**chat, "response_format": {
            "type": "json_object", "schema": {"type": "object", "properties": {'a"b': {"type": "string"}}}}})),
        Probe("unknown forced tool", bad, _post("/v1/chat/completions", {
            **chat, "functions": [{"name": "f", "parameters": {}}], "function_call": {"name": "g"}})),
        Probe("word as logit bias", bad, _post("/v1/chat/completions", {**chat, "logit_bias": {"hello": 5}})),
        Probe("token id out of range", bad, _post("/extras/detokenize", {"tokens": [0, -1]})),
        Probe("token id past the vocabulary", bad, _post("/extras/detokenize", {"tokens": [10**7]})),
        Probe("no key", {401}, _post("/v1/chat/completions", chat, {"Authorization": ""})),
        Probe("wrong key", {401}, _post("/v1/chat/completions", chat, {"Authorization": "Bearer nope"})),
        Probe("key with a suffix", {401}, _post("/v1/chat/completions", chat, {"Authorization": f"Bearer {KEY}x"})),
        Probe("basic auth", {401}, _post("/v1/completions", {"prompt": "a"}, {"Authorization": f"Basic {KEY}"})),
        Probe("schema without key", {401}, _get("/openapi.json", headers={})),
        Probe("embeddings", {404}, _post("/v1/embeddings", {"input": "x"})),
        Probe("docs", {404}, _get("/docs")),
        Probe("unknown path", {404}, _get("/v1/nothing")),
        Probe("wrong method", {405}, lambda client: client.delete("/v1/chat/completions", headers=AUTH).status_code),
        Probe("POST health", {405}, _post("/health", {})),
        Probe("body that stops", {408}, _raw(port, _partial(port, 400, b'{"messages": '))),
        Probe("client that leaves", set(), _raw(port, _partial(port, 400, b'{"mess'), close_early=True)),
        Probe("not HTTP", {400}, _raw(port, b"HELLO THERE\r\n\r\n"), audited=False),
    ]


def test_a_burst_of_hostile_requests(endpoint: Endpoint) -> None:
    """A few hundred requests at once, most of them wrong: each gets its 4xx (or 200), none a 5xx
    or a hang; the server then answers normally, and every request has its one audit line."""
    server = endpoint.server
    probes = _probes(server.port) * 6
    before = endpoint.audit_lines()
    results: list[tuple[Probe, int | None, float]] = []

    def run(probe: Probe) -> tuple[Probe, int | None, float]:
        started = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=60) as client:
            status = probe.send(client)
        return probe, status, time.monotonic() - started

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(run, probes))
    wall = time.monotonic() - started
    endpoint.sent["burst"] += len(probes)
    # a probe with no expected status is a client that leaves: it must get no answer
    wrong = [(p.name, status) for p, status, _ in results
             if (status not in p.expected if p.expected else status is not None)]
    assert not wrong, wrong
    # a request waits at most for the generations queued ahead of it (3 of at most 8 tokens): seconds on an
    # idle machine; the bound leaves room for a machine busy with other work and still catches a hang
    slowest = max(seconds for _, _, seconds in results)
    assert slowest < 60, f"a request took {slowest:.1f} s"
    print(f"\nburst: {len(probes)} requests in {wall:.1f} s, slowest {slowest:.1f} s, "
          f"{dict(Counter(s for _, s, _ in results))}")

    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    answer = server.client().chat.completions.create(model="any", messages=[{"role": "user", "content":
                                                                             QUESTIONS[1]}], temperature=0)
    assert answer.choices[0].message.content in endpoint.labels

    audited = [(p, s) for p, s, _ in results if p.audited]
    records = endpoint.wait_for_audit(before + len(audited) + 1)[before:]
    assert len(records) == len(audited) + 1, (len(records), len(audited) + 1)
    # the client that left got no answer; its line says why
    expected = Counter(s if s is not None else 400 for _, s in audited) + Counter([200])
    assert Counter(r["status"] for r in records) == expected
    assert sum(r.get("error") == "client_disconnected" for r in records) == 6
    log = server.audit.read_text(encoding="utf-8")
    assert KEY not in log and KEY not in server.output()


# -- requests that once crashed the server or got a 500 ------------------------------------------

DETOKENIZE = "/extras/detokenize"
REGRESSIONS = [
    # a token id outside the vocabulary aborted the process (std::out_of_range in llama.cpp)
    ("negative token id", DETOKENIZE, {"tokens": [-5]}, 400, "invalid_tokens"),
    ("token id one past the vocabulary", DETOKENIZE, {"tokens": [49152]}, 400, "invalid_tokens"),
    # a grammar llama.cpp cannot parse became a null sampler: a segfault
    ("unparsable grammar", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "grammar": "root ::= ("}, 400,
     "invalid_grammar"),
    ("unparsable grammar, streamed", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                              "stream": True, "grammar": "root ::= ("}, 400,
     "invalid_grammar"),
    ("quote in a response_format property", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
        "response_format": {"type": "json_object", "schema": {"type": "object", "properties": {
            'a"b': {"type": "string"}}}}}, 400, "invalid_grammar"),
    # 500s
    ("embeddings of a model loaded for generation", "/v1/embeddings", {"input": "The food was delicious"}, 404,
     "not_found"),
    ("completion without a prompt", "/v1/completions", {}, 400, "invalid_prompt"),
    ("batch of prompts", "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2}, 400, "invalid_prompt"),
    ("word as a logit bias key", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "logit_bias": {"abc": 1}},
     400, "invalid_logit_bias"),
    ("field out of its bounds", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "top_k": -1}, 400,
     "invalid_body"),
    ("lone surrogate", "/extras/tokenize", b'{"input":"\\ud800"}', 400, "invalid_json"),
    ("forced function that is not there", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "functions": [{"name": "f", "parameters": {}}], "function_call": {"name": "g"}}, 400, "unknown_tool"),
    ("null penalty", "/v1/completions", {"prompt": "The capital of France is", "stop": ["\n", "###"],
                                         "frequency_penalty": None}, 200, None),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), [r[1:] for r in REGRESSIONS],
                         ids=[r[0] for r in REGRESSIONS])
def test_requests_that_once_broke_the_server(endpoint: Endpoint, path: str, body: dict[str, Any] | bytes,
                                             status: int, code: str | None) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
    reply = httpx.post(f"{endpoint.server.url}{path}", content=data, timeout=60,
                       headers={**AUTH, "content-type": "application/json"})
    endpoint.sent["regressions"] += 1
    assert reply.status_code == status, reply.text
    if code is not None:
        assert reply.json()["error"]["code"] == code
    assert httpx.get(f"{endpoint.server.url}/health").status_code == 200


def test_bodies_not_sent_as_json_are_refused_before_fastapi_sees_them(endpoint: Endpoint) -> None:
    """A form body (what `curl -d` sends) and a body with no content type reached FastAPI's
    validation, which llama-cpp-python's route handler turns into a 500 (or, for a body that is not
    JSON, a bare 'Internal Server Error')."""
    url = endpoint.server.url
    form = httpx.post(f"{url}{DETOKENIZE}", content=b'{"tokens":[1,2]}', timeout=30,
                      headers={**AUTH, "content-type": "application/x-www-form-urlencoded"})
    bare = httpx.post(f"{url}/extras/tokenize", content=b"{not json", headers=AUTH, timeout=30)
    endpoint.sent["regressions"] += 2
    assert (form.status_code, bare.status_code) == (415, 415)
    assert form.json()["error"]["code"] == "unsupported_media_type"


def test_tokens_that_cut_a_character_short(endpoint: Endpoint) -> None:
    """Detokenizing the first of the tokens of an emoji decoded half a character strictly: a 500."""
    url = endpoint.server.url
    tokens = httpx.post(f"{url}/extras/tokenize", json={"input": "😀"}, headers=AUTH, timeout=30).json()["tokens"]
    assert len(tokens) > 1
    whole = httpx.post(f"{url}{DETOKENIZE}", json={"tokens": tokens}, headers=AUTH, timeout=30)
    part = httpx.post(f"{url}{DETOKENIZE}", json={"tokens": tokens[:1]}, headers=AUTH, timeout=30)
    endpoint.sent["regressions"] += 3
    assert whole.json() == {"text": "😀"}
    assert part.status_code == 400 and part.json()["error"]["code"] == "partial_character"


def test_a_body_that_stops_arriving_gets_408_in_bounded_time(endpoint: Endpoint) -> None:
    """A client that declared a body and sent only part of it held its connection (and the guard's
    coroutine) for as long as it liked."""
    port = endpoint.server.port
    started = time.monotonic()
    status = _raw(port, _partial(port, 400, b'{"messages": '))(httpx.Client())
    endpoint.sent["regressions"] += 1
    assert status == 408 and time.monotonic() - started < BODY_TIMEOUT_S + 5


# -- sustained load -------------------------------------------------------------------------------

def test_sustained_load_keeps_memory_flat_and_every_request_audited(endpoint: Endpoint) -> None:
    """A few clients sending small chats back to back for LOAD_SECONDS. Every answer is 200, or 429
    while the queue is full, and has its audit line. The server's resident memory after the warm-up
    (the first quarter) grows by less than 48 MiB: between samples it swings by about 10 MiB as the
    allocator reuses memory, and a leak of a few hundred KiB per answer (a body, a grammar sampler
    or a context buffer kept) crosses the bound; APPLIANCE_LOAD_SECONDS=600 shows smaller ones."""
    server = endpoint.server
    process = psutil.Process(server.process.pid)
    before = endpoint.audit_lines()
    outcomes: list[tuple[int, float, float]] = []  # status, latency, when it ended (from the start)
    rss: list[tuple[float, int]] = []
    start = time.monotonic()
    stop = start + LOAD_SECONDS

    def client(number: int) -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as session:
            while time.monotonic() < stop:
                body = {"messages": [{"role": "user", "content": QUESTIONS[number % len(QUESTIONS)]}],
                        "max_tokens": 4, "temperature": 0.7}
                sent = time.monotonic()
                status = session.post("/v1/chat/completions", json=body).status_code
                outcomes.append((status, time.monotonic() - sent, time.monotonic() - start))
                number += 1
                if status == 429:
                    time.sleep(0.2)

    workers = [threading.Thread(target=client, args=(n,)) for n in range(5)]
    for worker in workers:
        worker.start()
    while any(worker.is_alive() for worker in workers):
        rss.append((time.monotonic() - start, process.memory_info().rss))
        time.sleep(0.5)
    endpoint.sent["load"] += len(outcomes)

    statuses = Counter(status for status, _, _ in outcomes)
    latencies = sorted(seconds for status, seconds, _ in outcomes if status == 200)
    warm = [size for moment, size in rss if moment >= LOAD_SECONDS / 4]
    growth = (max(warm) - warm[0]) / 2**20
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))]
    print(f"\nload: {len(outcomes)} requests in {LOAD_SECONDS:g} s {dict(statuses)}, p50 {p50:.2f} s, "
          f"p95 {p95:.2f} s, RSS {rss[0][1] / 2**20:.0f} MiB at the start, {warm[0] / 2**20:.0f} after the "
          f"warm-up, {rss[-1][1] / 2**20:.0f} at the end (+{growth:.1f} MiB)")
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] >= 10, statuses
    assert growth < 48, f"resident memory grew by {growth:.1f} MiB after the warm-up"
    records = endpoint.wait_for_audit(before + len(outcomes))[before:]
    assert len(records) == len(outcomes)
    assert Counter(r["status"] for r in records) == statuses
    assert all(r["path"] == "/v1/chat/completions" for r in records)
