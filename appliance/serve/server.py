"""The OpenAI-compatible endpoint: llama-cpp-python's server, behind a guard that makes it safe
to leave running on a shared machine.

llama-cpp-python answers /v1/chat/completions (streaming too), /v1/completions and /v1/models.
In front of it, `Guard` (plain ASGI, so streaming passes through untouched):

- answers GET /health without a key (for systemd, load balancers and `curl`);
- checks the bearer key in constant time, and answers 401 in the OpenAI error shape;
- refuses bodies over the size limit (413) before reading them, and bodies that take longer than
  the body timeout to arrive (408);
- takes POST bodies as JSON only (415 otherwise), and checks them against their schema and against
  what the model can take (appliance/serve/checks.py) before llama-cpp-python sees them, so a
  malformed request gets a 400 that names the field, never a 500 or a crashed process;
- caps max_tokens, and fills it in when a request names none;
- puts the training system prompt in front of chats that bring none, and holds answers to the
  run's labels or JSON schema with a llama.cpp grammar unless the request brings its own;
- counts the prompt's tokens with the model's own template and tokenizer and answers a prompt
  the context window cannot hold with 400 `context_length_exceeded`, before anything streams;
- lets one request generate and a bounded number wait, and answers 429 beyond that;
- writes one audit line per request (health probes aside), refused ones included.

CORS is off unless origins are named. The schema at /openapi.json (behind the key, like every
route but /health) describes the guard's answers and limits too (appliance/serve/openapi.py).
Embeddings are not served (the model is loaded for generation), nor are the interactive docs
pages (they load their scripts from a CDN). The model loads once; SIGTERM stops accepting
connections and lets requests in flight finish (up to the shutdown timeout).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import ServeConfig
from appliance.offload import Offload
from appliance.pii import Redactor
from appliance.serve.audit import AuditLog, redacted, redacted_messages
from appliance.serve.checks import (
    GENERATION_PATHS,
    Rejection,
    check_decodes,
    check_logit_bias,
    check_prompt,
    check_tokens,
    grammar_parses,
    grammars,
    is_json,
    parse,
    request_models,
    validate,
)
from appliance.serve.model import ServedModel, context_length, formatter, grammar, prompt_tokens
from appliance.serve.openapi import published
from appliance.store import Store, now_iso

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Routes of llama-cpp-python's app that are not served: embeddings (the model is loaded for generation,
# so every call would fail with a 500) and the interactive docs (their pages load scripts from a CDN)
UNSERVED = ("/v1/embeddings", "/docs", "/docs/oauth2-redirect", "/redoc")
CLOSE = {"connection": "close"}  # the body was not read to its end: this connection cannot carry another request


@dataclass
class Policy:
    """What the guard knows about the model and the limits it enforces."""

    model: ServedModel
    llm: Any
    chat_format: Any
    n_ctx: int
    cfg: ServeConfig
    grammar: tuple[str, str] | None
    system: str | None
    admitted: int = 0  # requests generating or waiting to
    limit: int = field(init=False)

    def __post_init__(self) -> None:
        self.limit = 1 + self.cfg.max_queue


class Guard:
    def __init__(self, app: ASGIApp, policy: Policy, audit: AuditLog) -> None:
        self.app = app
        self.policy = policy
        self.audit = audit
        self._models = request_models()
        self.placement: Offload | None = None  # where the model's layers are (the start record says it)
        key = policy.cfg.api_key
        self._key = key.encode("utf-8") if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == "/health" and method in ("GET", "HEAD"):
            await _respond(send, 200, {"status": "ok", "model": self.policy.model.name,
                                       "generating_or_waiting": self.policy.admitted})
            return
        started = time.monotonic()
        client = scope.get("client")
        record: dict[str, Any] = {"time": now_iso(), "client": client[0] if client else None, "method": method,
                                  "path": path, "model": self.policy.model.name,
                                  "model_sha256": self.policy.model.sha256}
        outcome = Outcome()
        try:
            await self._handle(scope, receive, send, record, outcome)
        except Rejection as rejection:
            outcome.status = rejection.status
            record["error"] = rejection.code
            await _respond(send, rejection.status, rejection.body(), rejection.headers)
        except Exception:
            record["error"] = "internal_error"
            if not outcome.status:  # nothing went out yet: answer in the OpenAI shape; uvicorn logs the traceback
                outcome.status = 500
                await _respond(send, 500, {"error": {"message": "internal error: see the server's log",
                                                     "type": "internal_server_error", "param": None, "code": None}})
            raise
        finally:
            record["status"] = outcome.status
            record["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
            self._finish(record, outcome)
            self.audit.write(record)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, record: dict[str, Any],
                      outcome: Outcome) -> None:
        if scope["method"] == "OPTIONS" and self.policy.cfg.cors_origins:
            await self.app(scope, receive, outcome.wrap(send))  # CORS preflight carries no key
            return
        if scope["path"] == "/health":
            raise Rejection(405, f"/health answers GET and HEAD, not {scope['method']}", "method_not_allowed",
                            headers={"allow": "GET, HEAD"})
        self._authenticate(scope)
        if scope["path"] in UNSERVED:
            raise Rejection(404, f"{scope['path']} is not served here", "not_found")
        body = await self._read_body(scope, receive)
        model = self._models.get(scope["path"]) if scope["method"] == "POST" else None
        if model is None:  # GET /v1/models, /openapi.json, and what FastAPI answers with 404 or 405
            await self.app(scope, _replay(body, receive), outcome.wrap(send))
            return
        if not is_json(dict(scope["headers"]).get(b"content-type")):
            raise Rejection(415, "send the body as JSON, with 'Content-Type: application/json'",
                            "unsupported_media_type")
        request = parse(body)
        validate(model, request)
        # null means "the default" in the OpenAI API; llama-cpp-python hands some (the penalties) to llama.cpp as is
        request = {name: value for name, value in request.items() if value is not None}
        await self._check_runtime(scope["path"], request)
        if scope["path"] not in GENERATION_PATHS:
            checked = json.dumps(request).encode("utf-8")
            await self.app(_as_json(scope, checked), _replay(checked, receive), outcome.wrap(send))
            return
        chat = scope["path"] == "/v1/chat/completions"
        record["stream"] = bool(request.get("stream"))
        request, explicit = self._apply_policy(request, chat, record)
        record["prompt_tokens"] = outcome.prompt_tokens = await self._count(request, chat)
        self._check_fits(outcome.prompt_tokens, int(request["max_tokens"]), explicit, chat)
        if self.policy.cfg.log_prompts:
            outcome.redactor = Redactor()
            record["prompt"] = redacted_messages(request.get("messages") or [], outcome.redactor) if chat \
                else redacted(str(request.get("prompt") or ""), outcome.redactor)
        if self.policy.admitted >= self.policy.limit:
            raise Rejection(429, f"the server is busy: 1 request is being answered and {self.policy.cfg.max_queue} "
                            "are waiting; retry shortly", "rate_limit_exceeded", kind="rate_limit_error",
                            headers={"retry-after": "1"})
        self.policy.admitted += 1
        forwarded = json.dumps(request).encode("utf-8")
        try:
            await self.app(_as_json(scope, forwarded), _replay(forwarded, receive), outcome.wrap(send))
        finally:
            self.policy.admitted -= 1

    def _authenticate(self, scope: Scope) -> None:
        if self._key is None:
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._key):
            raise Rejection(401, "missing or wrong API key: send it as 'Authorization: Bearer <key>'",
                            "invalid_api_key")

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit, timeout = self.policy.cfg.max_body_kb * 1024, self.policy.cfg.body_timeout_s
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise Rejection(413, f"the request body is {int(declared):,} bytes; this server takes at most "
                            f"{limit:,}", "request_too_large", headers=CLOSE)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise Rejection(400, "the client closed the connection before the body was complete",
                                        "client_disconnected", headers=CLOSE)
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise Rejection(413, f"the request body is over {limit:,} bytes, the most this server "
                                        "takes", "request_too_large", headers=CLOSE)
                    chunks.append(chunk)
                    if not message.get("more_body"):
                        return b"".join(chunks)
        except TimeoutError as exc:
            raise Rejection(408, f"the request body did not arrive within {timeout:g} s", "request_timeout",
                            headers=CLOSE) from exc

    async def _check_runtime(self, path: str, request: dict[str, Any]) -> None:
        """What the schema cannot say: token ids of this vocabulary, one prompt, grammars llama.cpp parses."""
        from starlette.concurrency import run_in_threadpool

        llm, chat = self.policy.llm, path == "/v1/chat/completions"
        if path == "/extras/detokenize":
            check_tokens(request["tokens"], llm.n_vocab(), "tokens")
            await run_in_threadpool(check_decodes, llm, request["tokens"])
        if path not in GENERATION_PATHS:
            return
        if not chat:
            check_prompt(request)
        check_logit_bias(request, llm.n_vocab())
        for param, text in await run_in_threadpool(grammars, request, chat):
            if not await run_in_threadpool(grammar_parses, llm, text):
                raise Rejection(400, f"{param} asks for a grammar that llama.cpp cannot parse",
                                "invalid_grammar", param)

    def _apply_policy(self, request: dict[str, Any], chat: bool,
                      record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """The request as it goes to the model, and whether its max_tokens came from the client."""
        policy = self.policy
        cap = policy.cfg.max_tokens
        if request.get("max_tokens") is None and request.get("max_completion_tokens") is not None:
            request["max_tokens"] = request["max_completion_tokens"]
        request.pop("max_completion_tokens", None)
        asked = request.get("max_tokens")
        if asked is None:
            request["max_tokens"] = cap
        elif isinstance(asked, bool) or not isinstance(asked, int) or asked < 1 or asked > cap:
            raise Rejection(400, f"max_tokens is {asked!r}; this server allows 1 to {cap}", "invalid_max_tokens",
                            "max_tokens")
        record["max_tokens"] = request["max_tokens"]
        request["model"] = policy.model.name  # answers name the served model, never its file's path
        if not chat:
            return request, asked is not None
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Rejection(400, "messages must be a non-empty list of {role, content} objects", "invalid_messages",
                            "messages")
        if policy.system and not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
            request["messages"] = [{"role": "system", "content": policy.system}, *messages]
        own = ("grammar", "response_format", "tools", "functions")
        if policy.grammar is not None and not any(request.get(k) is not None for k in own):
            request["grammar"] = policy.grammar[0]
            record["constrained"] = policy.grammar[1]
        return request, asked is not None

    async def _count(self, request: dict[str, Any], chat: bool) -> int | None:
        """The prompt's tokens, rendered with the model's template and counted by its tokenizer."""
        from starlette.concurrency import run_in_threadpool

        policy = self.policy
        try:
            if chat:
                return await run_in_threadpool(prompt_tokens, policy.llm, policy.chat_format, request["messages"])
            prompt = str(request.get("prompt", ""))  # one text, by now (check_prompt)
            return len(await run_in_threadpool(policy.llm.tokenize, prompt.encode("utf-8")))
        except Exception as exc:  # a template that cannot render this conversation
            raise Rejection(400, f"the conversation cannot be rendered with the model's chat template: {exc}",
                            "invalid_messages", "messages") from exc

    def _check_fits(self, count: int | None, asked: int, explicit: bool, chat: bool) -> None:
        """A prompt the window cannot hold is refused; so is one that leaves no room for a max_tokens
        the client asked for (a defaulted one is shortened to fit instead)."""
        n_ctx, what = self.policy.n_ctx, "messages" if chat else "prompt"
        if count == 0:  # llama-cpp-python cannot start from nothing (a model that adds no BOS token)
            raise Rejection(400, f"the {what} hold{'' if chat else 's'} no text to answer", f"invalid_{what}", what)
        if count is None or (count < n_ctx and not (explicit and count + asked > n_ctx)):
            return
        detail = (f"however the {what} take{'' if chat else 's'} {count} tokens" if count >= n_ctx else
                  f"however you requested {count + asked} tokens ({count} in the {what}, {asked} in the completion)")
        raise Rejection(400, f"This model's maximum context length is {n_ctx} tokens, {detail}. Please reduce the "
                        f"length of the {what}{'' if count >= n_ctx else ' or completion'}.",
                        "context_length_exceeded", what)

    def _finish(self, record: dict[str, Any], outcome: Outcome) -> None:
        answer = outcome.answer()
        if outcome.usage:
            record["completion_tokens"] = outcome.usage.get("completion_tokens")
        elif answer is not None and record.get("prompt_tokens") is not None:
            record["completion_tokens"] = len(self.policy.llm.tokenize(answer.encode("utf-8"), add_bos=False,
                                                                         special=True)) if answer else 0
        if outcome.finish_reason:
            record["finish_reason"] = outcome.finish_reason
        if outcome.redactor is not None and answer is not None:
            record["answer"] = redacted(answer, outcome.redactor)


class Outcome:
    """What went back to the client: status, and for generations the text and token counts."""

    def __init__(self) -> None:
        self.status = 0
        self.prompt_tokens: int | None = None
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.redactor: Redactor | None = None
        self._streaming = False
        self._pending = b""
        self._body = bytearray()
        self._pieces: list[str] = []

    def wrap(self, send: Send) -> Send:
        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = int(message["status"])
                headers = dict(message.get("headers") or [])
                self._streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body":
                self._take(message.get("body", b""))
            await send(message)

        return recording_send

    def _take(self, chunk: bytes) -> None:
        if not self._streaming:
            if len(self._body) < 4 * 2**20:
                self._body += chunk
            return
        self._pending += chunk
        *events, self._pending = self._pending.replace(b"\r\n", b"\n").split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
                    self._chunk(json.loads(line[5:]))

    def _chunk(self, data: dict[str, Any]) -> None:
        for choice in data.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
            if piece:
                self._pieces.append(piece)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if data.get("usage"):
            self.usage = data["usage"]

    def answer(self) -> str | None:
        if self._streaming:
            return "".join(self._pieces)
        if self.status != 200 or not self._body:
            return None
        try:
            data = json.loads(bytes(self._body))
        except ValueError:
            return None
        self.usage = data.get("usage")
        choices = data.get("choices") or [{}]
        self.finish_reason = choices[0].get("finish_reason")
        message = choices[0].get("message")
        return str((message or {}).get("content") or "") if message is not None else str(choices[0].get("text", ""))


def _as_json(scope: Scope, body: bytes) -> Scope:
    """The scope of a request whose (checked, possibly rewritten) body goes on as JSON of this length."""
    headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json"),
                                 (b"content-length", str(len(body)).encode())]}


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel that hands the (possibly rewritten) body over once, then the client's own."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _respond(send: Send, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload).encode("utf-8")
    extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})


# -- building and running ------------------------------------------------------------------------

def create_app(cfg: ServeConfig, model: ServedModel, audit: AuditLog) -> Guard:
    """The guarded app. Loads the model (once); llama-cpp-python's server keeps it in its module."""
    os.environ.pop("CONFIG_FILE", None)  # llama-cpp-python would read its whole configuration from there
    from appliance import offload, toolchain

    toolchain.preload_cuda()
    from fastapi.middleware.cors import CORSMiddleware
    from llama_cpp.server import app as llama_server
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    n_ctx = cfg.n_ctx or context_length(model.path)
    threads = cfg.threads or os.cpu_count() or 1
    placed = offload.for_gguf(model.path, n_ctx)
    # model_construct: take exactly these settings, not environment variables named like their fields
    server_settings = ServerSettings.model_construct(host=cfg.host, port=cfg.port, api_key=None,
                                                     interrupt_requests=False, disable_ping_events=False,
                                                     root_path="", ssl_keyfile=None, ssl_certfile=None)
    model_settings = ModelSettings.model_construct(model=str(model.path), model_alias=model.name, n_ctx=n_ctx,
                                                   n_threads=threads, n_threads_batch=threads,
                                                   **placed.llama_settings(),
                                                   verbose=False)
    app = llama_server.create_app(server_settings=server_settings, model_settings=[model_settings])
    app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"])
    proxy = llama_server._llama_proxy
    assert proxy is not None
    llm = proxy()
    app.openapi_schema = published(app.openapi(), cfg.max_tokens, llm.n_vocab(), UNSERVED)
    chat_format = formatter(model, llm)
    if model.contract is not None:
        llm.chat_handler = chat_format.to_chat_handler()
    system = cfg.system if cfg.system is not None else (model.contract.system if model.contract else None)
    policy = Policy(model=model, llm=llm, chat_format=chat_format, n_ctx=n_ctx, cfg=cfg,
                    grammar=grammar(model) if cfg.constrain else None, system=system)
    guard = Guard(app, policy, audit)
    guard.placement = placed
    return guard


def audit_path(cfg: ServeConfig) -> Path:
    return Path(cfg.audit_log) if cfg.audit_log else Store(Path(cfg.store)).serve_audit_log


def serve(cfg: ServeConfig, model: ServedModel, announce: Callable[[str], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT; requests in flight finish first (up to the shutdown timeout)."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    AppStatus.disable_automatic_graceful_drain()  # type: ignore[no-untyped-call]  # streams finish at SIGTERM
    audit = AuditLog(audit_path(cfg), cfg.log_prompts)
    guard = create_app(cfg, model, audit)
    audit.write({"time": now_iso(), "event": "start", "model": model.name, "model_sha256": model.sha256,
                 "file": str(model.path), "verified": model.verified, "host": cfg.host, "port": cfg.port,
                 "api_key": cfg.api_key is not None,
                 "gpu_layers": guard.placement.n_gpu_layers if guard.placement else 0,
                 "placement": guard.placement.reason if guard.placement else "",
                 "constrained": guard.policy.grammar[1] if guard.policy.grammar else None,
                 "log_prompts": cfg.log_prompts, "pid": os.getpid()})
    config = uvicorn.Config(guard, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=cfg.shutdown_timeout_s, lifespan="off")
    server = uvicorn.Server(config)
    say = announce or (lambda line: print(line, file=sys.stderr, flush=True))
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    say(f"serving {model.name} ({model.path.name}, sha256 {model.sha256[:12]}, "
        f"{'verified' if model.verified else 'NOT verified'}) at http://{host}:{cfg.port}/v1")
    # uvicorn raises the signal again once it has shut down; with this handler in place SIGTERM ends in a
    # clean exit (status 0, audit closed) instead of the default kill
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        audit.write({"time": now_iso(), "event": "stop", "model": model.name, "pid": os.getpid()})
        audit.close()
    say("stopped")
