"""What the guard checks in a request body before llama-cpp-python sees it.

First what the published schema says, read strictly as JSON Schema reads it ("5" is not an
integer, true is not a number). llama-cpp-python's own validation would answer a violation with
a 500 (its route handler turns every exception into one), and its lax parsing would take "5".

Then what no schema can say but the runtime relies on. Left to the runtime, a token id outside the
vocabulary or a grammar llama.cpp cannot parse kills the whole server process (an abort or a
segfault in native code); a batch of prompts, an empty one, a logit bias keyed by a word, a forced
tool that is not in the request or tokens that stop inside a character end in a 500. Each is
answered here with a 400 that names the field, in the OpenAI error shape.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ValidationError

GRAMMAR_ROOT = b"root"
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


class Rejection(Exception):
    """A request answered by the guard itself, in the OpenAI error shape."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def request_models() -> dict[str, type[BaseModel]]:
    """The body model of each POST route of llama-cpp-python's server that the guard lets through."""
    from llama_cpp.server.types import (
        CreateChatCompletionRequest,
        CreateCompletionRequest,
        DetokenizeInputRequest,
        TokenizeInputRequest,
    )

    return {"/v1/chat/completions": CreateChatCompletionRequest, "/v1/completions": CreateCompletionRequest,
            "/extras/tokenize": TokenizeInputRequest, "/extras/tokenize/count": TokenizeInputRequest,
            "/extras/detokenize": DetokenizeInputRequest}


def is_json(content_type: bytes | None) -> bool:
    """Whether a Content-Type names JSON. Nothing else is taken: FastAPI would hand a form or plain
    text to validation (a 500 through llama-cpp-python's handler), and a web page may send those to
    a loopback server from the user's browser without a CORS preflight."""
    media = (content_type or b"").split(b";")[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def parse(body: bytes) -> dict[str, Any]:
    """The body as a JSON object. NaN, Infinity and numbers too large for a float are refused (they
    are not JSON, and a NaN temperature samples garbage), and so are lone surrogates such as
    "\\ud800" (no tokenizer or log file can encode them). Whole numbers come out as ints, however
    they are written."""
    try:
        request = json.loads(body, parse_constant=_not_json, parse_float=_number)
        json.dumps(request, ensure_ascii=False).encode("utf-8")
    except RecursionError as exc:
        raise Rejection(400, "the request body is nested too deeply", "invalid_json") from exc
    except UnicodeEncodeError as exc:
        raise Rejection(400, "the request body has text that is not valid Unicode (a lone surrogate)",
                        "invalid_json") from exc
    except ValueError as exc:
        raise Rejection(400, f"the request body is not valid JSON: {exc}", "invalid_json") from exc
    if not isinstance(request, dict):
        raise Rejection(400, "the request body must be a JSON object", "invalid_json")
    return request


def _not_json(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _number(text: str) -> int | float:
    """A JSON number with a fraction or exponent. One with no fractional part is an integer, as JSON
    Schema reads it (5.0 is a valid max_tokens), so it becomes an int."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a number")
    return int(value) if value.is_integer() else value


def validate(model: type[BaseModel], request: dict[str, Any]) -> None:
    """The body against its schema, strictly; a 400 naming the first fields at fault."""
    try:
        model.model_validate(request, strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        named = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:3]]
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise Rejection(400, f"the request does not match the schema: {'; '.join(named)}{more}", "invalid_body",
                        str(errors[0]["loc"][0]) if errors[0]["loc"] else None) from exc


def check_tokens(tokens: list[int], n_vocab: int, param: str) -> None:
    wrong = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if wrong is not None:
        raise Rejection(400, f"token id {wrong} is not in this model's vocabulary (0 to {n_vocab - 1})",
                        "invalid_tokens", param)


def check_decodes(llm: Any, tokens: list[int]) -> None:
    """Token ids that spell out whole characters: llama-cpp-python decodes the text strictly, and a
    sequence that starts or stops inside a multi-byte character would fail there with a 500."""
    try:
        llm.detokenize(tokens).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejection(400, f"these tokens do not decode to UTF-8 text on their own (bytes {exc.start} to "
                        f"{exc.end} are part of a character cut short); send the tokens of whole characters",
                        "partial_character", "tokens") from exc


def check_logit_bias(request: dict[str, Any], n_vocab: int) -> None:
    """Logit bias keys are token ids, unless logit_bias_type is 'tokens' (then they are text)."""
    bias = request.get("logit_bias")
    if not bias or request.get("logit_bias_type") == "tokens":
        return
    for key in bias:
        if not (key.isascii() and key.isdigit()) or int(key) >= n_vocab:
            raise Rejection(400, f"logit_bias key {key[:40]!r} is not a token id of this model (0 to {n_vocab - 1}; "
                            "set logit_bias_type to 'tokens' to bias by text)", "invalid_logit_bias", "logit_bias")


def check_prompt(request: dict[str, Any]) -> None:
    """One prompt per request, given as text (a one-element list is unwrapped)."""
    prompt = request.get("prompt", "")
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise Rejection(400, f"prompt holds {len(prompt)} prompts; this server answers exactly one per "
                            "request", "invalid_prompt", "prompt")
        request["prompt"] = prompt[0]


def grammars(request: dict[str, Any], chat: bool) -> list[tuple[str, str]]:
    """The grammars llama-cpp-python will build from this request, each with the field it comes from,
    derived the way llama-cpp-python derives them (a schema it cannot convert falls back to JSON)."""
    from llama_cpp.llama_grammar import JSON_GBNF

    found: list[tuple[str, str]] = []
    if request.get("grammar") is not None:
        found.append(("grammar", request["grammar"]))
    if not chat:
        return found
    response_format = request.get("response_format")
    if response_format is not None and response_format.get("type") == "json_object":
        schema = response_format.get("schema")
        found.append(("response_format", JSON_GBNF if "schema" not in response_format else _from_schema(schema)))
    tool = forced_tool(request)
    if tool is not None:
        found.append(("tools", _from_schema(tool["function"]["parameters"])))
    return found


def forced_tool(request: dict[str, Any]) -> dict[str, Any] | None:
    """The tool the request forces the answer into, if any; a 400 when it names one it does not bring."""
    tools = request.get("tools")
    if request.get("functions") is not None:
        tools = [{"type": "function", "function": f} for f in request["functions"]]
    choice = request.get("tool_choice")
    call = request.get("function_call")
    if isinstance(call, dict) and "name" in call:
        choice = {"type": "function", "function": {"name": call["name"]}}
    if not isinstance(choice, dict) or tools is None:
        return None
    name = choice["function"]["name"]
    tool: dict[str, Any] | None = next((t for t in tools if t["function"]["name"] == name), None)
    if tool is None:
        param = "function_call" if isinstance(call, dict) else "tool_choice"
        raise Rejection(400, f"{param} names {name[:80]!r}, which is not among the request's "
                        f"{'functions' if request.get('functions') is not None else 'tools'}", "unknown_tool", param)
    return tool


def _from_schema(schema: Any) -> str:
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception:  # noqa: BLE001  # llama-cpp-python falls back to plain JSON for any schema it cannot convert
        return str(JSON_GBNF)


def grammar_parses(llm: Any, text: str) -> bool:
    """Whether llama.cpp accepts the grammar. Tried with llama.cpp's own parser, on a sampler that
    is freed at once: a grammar it refuses would otherwise reach the sampler chain as a null
    pointer and crash the process."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, text.encode("utf-8"), GRAMMAR_ROOT)
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True
