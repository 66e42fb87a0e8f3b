"""From a raw record to a conversation: dataset conventions (OpenAI chat, ShareGPT, Alpaca,
prompt/completion) and the enterprise tasks (chat, classification, extraction) with templates."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.data.schema import ROLES, Example, Record, RowError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "bot": "assistant", "system": "system"}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

DEFAULT_TEMPLATES: dict[str, dict[str, str]] = {
    "classification": {
        "system": "Classify the text into exactly one of these labels: {{ labels | join(', ') }}. "
                  "Answer with the label only.",
        "user": "{{ text }}",
        "assistant": "{{ label }}",
    },
    "extraction": {
        "system": "Extract the information described by this JSON schema from the text. "
                  "Answer with one JSON object only.\nSchema: {{ schema }}",
        "user": "{{ text }}",
        "assistant": "{{ output }}",
    },
}


@dataclass
class TaskSpec:
    """How records become conversations for one task."""

    task: str = "chat"  # chat | classification | extraction
    text_field: str = "text"
    label_field: str = "label"
    output_field: str = "output"
    labels: list[str] | None = None
    schema: dict[str, Any] | None = None
    template: dict[str, str] | None = None  # system/user/assistant Jinja templates
    _compiled: dict[str, Any] = field(default_factory=dict, repr=False)

    def compiled(self) -> dict[str, Any]:
        if not self._compiled:
            from jinja2 import StrictUndefined
            from jinja2.sandbox import SandboxedEnvironment

            env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False)
            source = self.template or DEFAULT_TEMPLATES.get(self.task, {})
            self._compiled = {role: env.from_string(text) for role, text in source.items() if text}
        return self._compiled


def load_template(path: Path) -> dict[str, str]:
    """A user template: a YAML or JSON file with `system`, `user` and `assistant` Jinja strings. Anything
    wrong with it is a ConfigError that names the file and the line or the role at fault."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import SandboxedEnvironment

    from appliance.config import load_settings
    from appliance.errors import ConfigError

    hint = "A template has `user` and `assistant` (and may have `system`) Jinja strings, e.g. user: '{{ text }}'."
    data = load_settings(path, what="template")
    unknown = sorted(set(data) - set(ROLES))
    if unknown:
        raise ConfigError(f"{data.origins.get(unknown[0], path)}: unknown key {unknown[0]!r}: use system, user, "
                          "assistant", hint)
    missing = [role for role in ("user", "assistant") if role not in data]
    if missing:
        raise ConfigError(f"{path}: the template has no {' and no '.join(missing)}", hint)
    env = SandboxedEnvironment()
    template: dict[str, str] = {}
    for role, text in data.items():
        where = data.origins.get(role, str(path))
        if text is None or (isinstance(text, str) and not text.strip()):
            if role == "system":
                continue  # an empty `system:`: no system turn
            raise ConfigError(f"{where}: {role}: is empty", hint)
        if not isinstance(text, str | int | float) or isinstance(text, bool):
            raise ConfigError(f"{where}: {role}: must be text (a Jinja template), not {type(text).__name__}", hint)
        try:
            env.parse(str(text))
        except TemplateSyntaxError as exc:
            raise ConfigError(f"{where}: {role}: broken Jinja on line {exc.lineno} of the template: {exc.message}",
                              hint) from exc
        template[role] = str(text)
    return template


def load_schema(path: Path) -> dict[str, Any]:
    """The JSON schema of an extraction's answers. Anything wrong with the file is a ConfigError that
    names it, with the line of a JSON syntax error."""
    import jsonschema

    from appliance.errors import ConfigError

    hint = "Give a JSON schema file, e.g. {\"type\": \"object\", \"properties\": {\"name\": {\"type\": \"string\"}}}."
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the schema {path}: {exc.strerror or exc}", hint) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})", "Save the file as UTF-8.") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: broken JSON: {exc.msg}", hint) from exc
    except (RecursionError, ValueError) as exc:  # nested too deeply, a number with thousands of digits
        raise ConfigError(f"{path}: not a usable JSON schema: {type(exc).__name__}", hint) from exc
    if not isinstance(schema, dict):
        raise ConfigError(f"{path}: a JSON schema is an object, not {type(schema).__name__}", hint)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top level"
        raise ConfigError(f"{path}: not a valid JSON schema at {where}: {exc.message}", hint) from exc
    return schema


def to_example(record: Record, fmt: str, spec: TaskSpec) -> Example:
    """Convert one record (not yet cleaned or checked); raises RowError naming the field at fault."""
    if spec.task == "chat" and spec.template is None:
        messages = _convention(record.data, fmt)
        label = None
    else:
        messages, label = _templated(record.data, spec)
    return Example(record.file, record.line, messages, label)


def _convention(data: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    if fmt == "openai":
        turns = data.get("messages")
        if not isinstance(turns, list):
            raise RowError("messages", "must be a list of {role, content} objects")
        out = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RowError(f"messages[{i}]", "must be an object with role and content")
            if "role" not in turn:
                raise RowError(f"messages[{i}].role", "is missing")
            role = OPENAI_ROLES.get(str(turn["role"]))
            if role is None:
                raise RowError(f"messages[{i}].role", f"unknown role {turn['role']!r}: use system, user "
                               "or assistant")
            out.append({"role": role, "content": _text_content(turn, f"messages[{i}].content")})
        return out
    if fmt == "sharegpt":
        turns = data.get("conversations")
        if not isinstance(turns, list):
            raise RowError("conversations", "must be a list of {from, value} objects")
        out = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RowError(f"conversations[{i}]", "must be an object with from and value")
            if "from" not in turn:
                raise RowError(f"conversations[{i}].from", "is missing")
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise RowError(f"conversations[{i}].from", f"unknown speaker {turn['from']!r}: use human, "
                               "gpt or system")
            value = turn.get("value")
            if not isinstance(value, str):
                raise RowError(f"conversations[{i}].value", _not_text(value))
            out.append({"role": role, "content": value})
        return out
    if fmt == "alpaca":
        instruction, extra, output = (data.get(k, "") for k in ("instruction", "input", "output"))
        for key, value in (("instruction", instruction), ("input", extra), ("output", output)):
            if not isinstance(value, str):
                raise RowError(key, _not_text(value))
        messages = [{"role": "system", "content": data["system"]}] if isinstance(data.get("system"), str) else []
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [*messages, {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if not isinstance(data.get(key), str):
                raise RowError(key, _not_text(data.get(key)))
        return [{"role": "user", "content": data["prompt"]}, {"role": "assistant", "content": data["completion"]}]
    raise RowError("", "a table row needs a task (--task classification|extraction) or a --template to "
                   "become a conversation")


def _text_content(turn: dict[str, Any], where: str) -> str:
    content = turn.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text parts are usable here
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RowError(f"{where}[{j}]", f"is a non-text part ({kind}): only text is supported")
            texts.append(part["text"])
        return "".join(texts)
    if content is None and "content" not in turn:
        raise RowError(where, "is missing")
    raise RowError(where, _not_text(content))


def _not_text(value: Any) -> str:
    return "is missing" if value is None else f"must be text, got {type(value).__name__}"


def _templated(data: dict[str, Any], spec: TaskSpec) -> tuple[list[dict[str, str]], str | None]:
    variables = dict(data)
    label: str | None = None
    if spec.task in ("classification", "extraction"):
        text = data.get(spec.text_field)
        if not isinstance(text, str):
            raise RowError(spec.text_field, _not_text(text) + " (set the text column with --text-field)")
        variables["text"] = text
    if spec.task == "classification":
        raw = data.get(spec.label_field)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise RowError(spec.label_field, "is missing (set the label column with --label-field)")
        label = str(raw).strip()
        if spec.labels is not None and label not in spec.labels:
            raise RowError(spec.label_field, f"label {label!r} is not in the label set "
                           f"({', '.join(spec.labels[:10])})")
        variables["label"] = label
        variables["labels"] = spec.labels or []
    if spec.task == "extraction":
        variables["output"] = _extraction_output(data.get(spec.output_field), spec)
        variables["schema"] = json.dumps(spec.schema, ensure_ascii=False) if spec.schema else "{}"
    messages = []
    from jinja2 import TemplateError, UndefinedError

    for role in ROLES:
        template = spec.compiled().get(role)
        if template is None:
            continue
        try:
            content = template.render(**variables)
        except UndefinedError as exc:
            raise RowError("template", f"{role} template uses a field this row lacks: {exc.message}") from exc
        except TemplateError as exc:
            raise RowError("template", f"{role} template failed: {exc}") from exc
        except Exception as exc:  # the template's own expressions on this row's values (1 / 0, "a" + 1)
            raise RowError("template", f"{role} template failed on this row: {type(exc).__name__}: {exc}") from exc
        messages.append({"role": role, "content": content})
    return messages, label


def _extraction_output(value: Any, spec: TaskSpec) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError(spec.output_field, f"is not valid JSON: {exc.msg}") from exc
    if not isinstance(value, dict):
        raise RowError(spec.output_field, "must be a JSON object (the extracted fields)")
    if spec.schema:
        import jsonschema
        from referencing.exceptions import Unresolvable

        try:
            errors = sorted(jsonschema.Draft202012Validator(spec.schema).iter_errors(value),
                            key=lambda e: [str(p) for p in e.path])
        except Unresolvable as exc:
            raise RowError(spec.output_field, f"the schema cannot be applied: a $ref does not resolve ({exc}); "
                           "point every $ref inside the schema, e.g. #/$defs/name") from exc
        if errors:
            where = ".".join(str(p) for p in errors[0].absolute_path)
            raise RowError(f"{spec.output_field}{'.' + where if where else ''}",
                           f"does not match the schema: {errors[0].message}")
    return json.dumps(value, ensure_ascii=False)


def check_messages(messages: list[dict[str, str]]) -> None:
    """Roles in a trainable order: optional system first, then user/assistant alternating,
    ending with the assistant; no empty turn."""
    if not messages:
        raise RowError("messages", "is empty")
    expected = "user"
    for i, message in enumerate(messages):
        role = message["role"]
        if not message["content"].strip():
            raise RowError(f"messages[{i}].content", "is empty")
        if role == "system":
            if i != 0:
                raise RowError(f"messages[{i}].role", "a system turn is only allowed first")
            continue
        if role != expected:
            raise RowError(f"messages[{i}].role", f"wrong turn order: expected {expected}, got {role}")
        expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != "assistant":
        raise RowError("messages", "must end with an assistant turn (the answer to learn)")
