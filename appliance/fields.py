"""The fields of a stage's config as a front end shows them: the CLI's options and the TUI's forms are both
made from this, so a field added to a config appears in both, with the same help, choices, bounds and
default, and a value typed in either is validated by the config itself, with the same message.

A field's text (what a person types) becomes its value with `parse`, and a value becomes text with `text`:
lists are comma-separated (`8,16`), mappings are `NAME=VALUE` pairs (`run-a=0.5,run-b=1`), the three split
fractions are `0.8,0.1,0.1`. Values are not checked here: pydantic checks them, against the config.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Union

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from appliance.errors import ConfigError

Kind = Literal["bool", "int", "float", "text", "choice", "list", "mapping", "tuple"]


@dataclass(frozen=True)
class FieldSpec:
    name: str  # the config's field name
    kind: Kind
    description: str
    default: Any  # None when the field has no default (required) or defaults to None
    required: bool
    optional: bool  # None is a value (the field may be left empty)
    choices: tuple[str, ...] = ()  # a choice's values; a list's single-word alternatives (all-linear)
    bounds: str = ""  # e.g. "1 to 1024", "> 0", "2 characters"
    secret: bool = False  # never shown (an API key)
    flag: str = ""  # the command-line option, when it is not the field's name (--ctx for n_ctx)

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")

    @property
    def help(self) -> str:
        """The description with what it takes: choices, bounds and the default."""
        return self.help_text()

    def help_text(self, choices: bool = True) -> str:
        """The help, without the choices of a choice field when they are shown beside it (a command's metavar)."""
        extra = []
        if self.kind == "choice":
            if choices:
                extra.append(" | ".join(self.choices))
        elif self.choices:
            extra.append(f"or {' | '.join(self.choices)}")
        if self.bounds:
            extra.append(self.bounds)
        if self.kind == "list":
            extra.append("comma-separated")
        elif self.kind == "mapping":
            extra.append("NAME=VALUE, comma-separated")
        if not self.required and not self.secret and self.default not in (None, [], {}, ""):
            extra.append(f"default {self.text(self.default)}")
        return self.description + (f" [{'; '.join(extra)}]" if extra else "")

    def values_to_try(self) -> FieldSpec:
        """The field as several values to try, comma-separated (a sweep's grid)."""
        return replace(self, kind="list", description=f"Values to try, comma-separated: {self.description}",
                       default=None, optional=False, choices=())

    def parse(self, text: str | Iterable[str]) -> Any:
        """What was typed, as the value the config validates; an empty text is None for an optional field.
        Several texts (an option given more than once) are joined as one comma-separated list."""
        if not isinstance(text, str):
            text = ",".join(text)
        text = text.strip()
        if not text and (self.optional or self.kind in ("list", "mapping")):
            return None if self.optional else ([] if self.kind == "list" else {})
        if self.kind == "list":
            return text if text in self.choices else [part.strip() for part in text.split(",") if part.strip()]
        if self.kind == "tuple":
            return [part.strip() for part in text.replace("/", ",").split(",")]
        if self.kind == "mapping":
            pairs = [part.strip() for part in text.split(",") if part.strip()]
            return dict(_pair(self, pair) for pair in pairs)
        if self.kind == "bool":
            return text.lower() in ("1", "true", "yes", "on", "y")
        return text  # numbers, choices and text: pydantic reads the text as the field's type

    def text(self, value: Any) -> str:
        """A value as a person would type it (the inverse of `parse`)."""
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, dict):
            return ",".join(f"{k}={_number(v)}" for k, v in value.items())
        if isinstance(value, list | tuple):
            return ",".join(_number(v) for v in value)
        return _number(value)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _pair(spec: FieldSpec, pair: str) -> tuple[str, str]:
    name, sep, value = pair.partition("=")
    if not sep:
        value = "1"  # a name alone counts once
    if not name.strip():
        raise ConfigError(f"{spec.option} {pair!r}: a name is missing before '='", f"Write {spec.option} NAME=VALUE.")
    return name.strip(), value.strip()


@functools.cache
def fields(config: type[BaseModel], exclude: tuple[str, ...] = ("store",)) -> tuple[FieldSpec, ...]:
    """The fields of a config in the order it declares them, except `exclude`."""
    return tuple(describe(name, info) for name, info in config.model_fields.items() if name not in exclude)


def describe(name: str, info: FieldInfo) -> FieldSpec:
    annotation = info.annotation
    optional = _allows_none(annotation)
    core = [a for a in _alternatives(annotation) if a is not type(None)]
    kind, choices = _kind(core)
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return FieldSpec(name=name, kind=kind, description=(info.description or name.replace("_", " ")).rstrip("."),
                     default=None if info.is_required() else info.get_default(call_default_factory=True),
                     required=info.is_required(), optional=optional, choices=choices, bounds=_bounds(info, kind),
                     secret=info.repr is False, flag=str(extra.get("option", "")))


def _alternatives(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _alternatives(arg)]
    return [annotation]


def _allows_none(annotation: Any) -> bool:
    return type(None) in _alternatives(annotation)


def _kind(alternatives: list[Any]) -> tuple[Kind, tuple[str, ...]]:
    literals = tuple(str(v) for a in alternatives if typing.get_origin(a) is Literal for v in typing.get_args(a))
    others = [a for a in alternatives if typing.get_origin(a) is not Literal]
    if not others:
        return "choice", literals
    origin = typing.get_origin(others[0]) or others[0]
    return _KINDS.get(origin, "text"), literals


_KINDS: dict[Any, Kind] = {list: "list", dict: "mapping", tuple: "tuple", bool: "bool", int: "int", float: "float"}


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}" if what else str(n)


def _bounds(info: FieldInfo, kind: Kind) -> str:
    low: Any = None
    high: Any = None
    low_open = high_open = False
    length = []
    for item in info.metadata:
        if isinstance(item, Ge):
            low = item.ge
        elif isinstance(item, Gt):
            low, low_open = item.gt, True
        elif isinstance(item, Le):
            high = item.le
        elif isinstance(item, Lt):
            high, high_open = item.lt, True
        elif isinstance(item, MinLen):
            length.append(("at least", item.min_length))
        elif isinstance(item, MaxLen):
            length.append(("at most", item.max_length))
    unit = "" if kind in ("list", "mapping") else "character"
    if length and len(length) == 2 and length[0][1] == length[1][1]:
        return _count(length[0][1], unit)
    if length:
        return ", ".join(f"{word} {_count(n, unit)}" for word, n in length)
    if low is not None and high is not None and not low_open and not high_open:
        return f"{_number(low)} to {_number(high)}"
    parts = ([f"{'>' if low_open else '>='} {_number(low)}"] if low is not None else []) + \
        ([f"{'<' if high_open else '<='} {_number(high)}"] if high is not None else [])
    return ", ".join(parts)


def validated(config: type[BaseModel], values: Mapping[str, Any], origins: Mapping[str, str] | None = None,
              name: Any = None) -> Any:
    """The config built from settings of any shape (a recipe file's, the command line's, a form's), with every
    problem in one ConfigError. A setting listed in `origins` ("file:line") is named there; any other by
    `name(field)` (the CLI's option, a form's label), by its option when not given."""
    namer = name or (lambda field: option_of(config, field))
    try:
        return config.model_validate(dict(values))
    except ValidationError as exc:
        problems = "; ".join(problem(e, config, origins or {}, namer) for e in exc.errors())
        raise ConfigError(problems, "See --help for the allowed values.") from exc


def option_of(config: type[BaseModel], name: str) -> str:
    """The command-line option of a field (what a user typed)."""
    spec = next((f for f in fields(config, ()) if f.name == name), None)
    return spec.option if spec is not None else "--" + name.replace("_", "-")


def problem(error: Any, config: type[BaseModel], origins: Mapping[str, str], namer: Any) -> str:
    """One validation problem as a sentence that names where the value came from."""
    message = str(error["msg"]).removeprefix("Value error, ")
    loc = error["loc"]
    if not loc:  # a rule about several fields together
        return message
    field = str(loc[0])
    if error["type"] == "extra_forbidden":
        import difflib

        close = difflib.get_close_matches(field, list(config.model_fields), n=1)
        message = "is not a setting" + (f"; did you mean {close[0]}?" if close else "")
    where = ".".join(map(str, loc[1:]))
    if field in origins:
        return f"{origins[field]}: {'.'.join(map(str, loc))}: {message}"
    return f"{namer(field)}{'.' + where if where else ''}: {message}"
