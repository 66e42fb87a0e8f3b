"""The OpenAPI schema the endpoint publishes at /openapi.json: llama-cpp-python's, made true of
this server.

llama-cpp-python describes its routes and bodies; the guard in front of them adds answers and
limits of its own. So the published schema also says:

- every route may answer 401 (a missing or wrong key), and every POST 400 (a body that is not
  JSON, or not what the schema says, or that the model cannot take), 408 (a body that arrived too
  slowly), 413 (too large) and 415 (not sent as JSON), all in the OpenAI error shape; generations
  may answer 429 (busy) with Retry-After. The 422 FastAPI would answer never happens: the guard
  answers invalid bodies itself, with 400;
- max_tokens (and max_completion_tokens) run from 1 to the server's cap, a chat has at least one
  message, a completion exactly one non-empty prompt, token ids lie within the vocabulary;
- generations may stream (text/event-stream);
- GET /health answers without a key;
- embeddings are not served.
"""

from __future__ import annotations

import copy
from typing import Any

from appliance.serve.checks import GENERATION_PATHS

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
HEALTH = {"type": "object", "required": ["status", "model", "generating_or_waiting"],
          "properties": {"status": {"const": "ok"}, "model": {"type": "string"},
                         "generating_or_waiting": {"type": "integer", "minimum": 0}}}
# one server-sent event of a streamed answer (before Open API 3.2, the schema of an event stream is that of
# one event): its data is a JSON chunk of the answer, or [DONE] at the end
EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"},
                                                                 "event": {"type": "string"}}}
GUARD_ANSWERS = {
    "400": "The body is not JSON, does not match the schema, or asks what the model cannot do (a prompt over "
           "the context window, a grammar llama.cpp cannot parse, a token id outside the vocabulary)",
    "408": "The body did not arrive within the server's body timeout",
    "413": "The body is larger than the server takes",
    "415": "The body was not sent as application/json",
}


def published(schema: dict[str, Any], max_tokens: int, n_vocab: int, unserved: tuple[str, ...]) -> dict[str, Any]:
    """`schema` (FastAPI's, from llama-cpp-python's routes) with the guard's answers and limits, less
    the routes the guard does not serve."""
    schema = copy.deepcopy(schema)
    for path in unserved:
        schema.get("paths", {}).pop(path, None)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Error"] = ERROR
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            _answers(operation, method == "post", path in GENERATION_PATHS)
    _limit_bodies(components, max_tokens, n_vocab)
    schema["paths"]["/health"] = {"get": {
        "summary": "Health", "operationId": "health", "security": [],
        "responses": {"200": {"description": "The server is up", "content": {"application/json": {"schema": HEALTH}}}},
    }}
    return schema


def _answers(operation: dict[str, Any], post: bool, generation: bool) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)
    answers = {"401": "Missing or wrong API key", **(GUARD_ANSWERS if post else {})}
    if generation:
        answers["429"] = "Busy: one request is generating and the queue is full; retry after Retry-After seconds"
    for status, description in answers.items():
        responses[status] = {"description": description, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}}
    if generation:
        responses["429"]["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 0}}}
        ok = responses["200"].setdefault("content", {})
        ok["text/event-stream"] = {"schema": EVENT}  # stream: true


def _limit_bodies(components: dict[str, Any], max_tokens: int, n_vocab: int) -> None:
    bounded = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": max_tokens}, {"type": "null"}],
               "description": f"Most tokens to generate: 1 to {max_tokens} (the server's cap, and the default)"}
    for name in ("CreateChatCompletionRequest", "CreateCompletionRequest"):
        properties = components[name]["properties"]
        properties["max_tokens"] = {**properties["max_tokens"], **bounded}
        properties["max_tokens"].pop("default", None)
        properties["max_completion_tokens"] = {**bounded, "description": "The same as max_tokens"}
    chat = components["CreateChatCompletionRequest"]
    chat["properties"]["messages"]["minItems"] = 1
    chat["required"] = sorted({*chat.get("required", []), "messages"})
    completion = components["CreateCompletionRequest"]
    prompt = completion["properties"]["prompt"]
    prompt["anyOf"] = [{"type": "string", "minLength": 1},
                       {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1}]
    prompt.pop("default", None)
    completion["required"] = sorted({*completion.get("required", []), "prompt"})
    tokens = components["DetokenizeInputRequest"]["properties"]["tokens"]
    tokens["items"] = {"type": "integer", "minimum": 0, "maximum": n_vocab - 1}
