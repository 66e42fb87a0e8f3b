"""A command's options made from a stage's config: one option per field, with the field's name, help,
choices, bounds and default (see appliance/fields.py), so a field added to a config is an option of every
command that takes that config, and what is typed is validated by the config itself.

    @app.command()
    @config_options(EvalConfig)
    def evaluate(run: ..., settings: Settings) -> None:
        cfg = validated(EvalConfig, {**settings, "store": ...})

The command receives `settings`: the fields given on the command line, parsed but not yet checked, so
that a recipe or a recorded run can supply the others.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel

from appliance.fields import FieldSpec, fields

F = TypeVar("F", bound=Callable[..., Any])
Settings = dict[str, Any]

_METAVAR = {"int": "INTEGER", "float": "NUMBER", "text": "TEXT", "list": "VALUES", "mapping": "NAME=VALUE",
            "tuple": "A,B,C"}


def config_options(config: type[BaseModel], exclude: tuple[str, ...] = ("store",), arguments: tuple[str, ...] = (),
                   only: tuple[str, ...] | None = None, lists: bool = False) -> Callable[[F], F]:
    """Give the decorated command an option (or, for the fields in `arguments`, an argument) per field of
    `config`, except `exclude` and the fields the command declares itself; with `only`, just those.
    `lists`: each option takes several values of its field (a sweep's grid)."""

    def decorate(func: F) -> F:
        own = inspect.signature(func, eval_str=True)
        taken = set(own.parameters)
        specs = [s for s in fields(config, exclude) if s.name not in taken and (only is None or s.name in only)]
        if lists:
            specs = [s.values_to_try() for s in specs]
        generated = [_parameter(s, s.name in arguments) for s in specs]
        kept = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own.parameters.values() if p.name != "settings"]

        def command(*args: Any, **kwargs: Any) -> Any:
            settings: Settings = {}
            for spec in specs:
                value = kwargs.pop(spec.name, None)
                if value is None or (isinstance(value, list | tuple) and not value):
                    continue
                settings[spec.name] = value if isinstance(value, bool) else spec.parse(value)
            return func(*args, settings=settings, **kwargs)

        signature = own.replace(parameters=kept + generated)
        command.__signature__ = signature  # type: ignore[attr-defined]  # what typer reads the options from
        command.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        command.__name__, command.__doc__, command.__module__ = func.__name__, func.__doc__, func.__module__
        return command  # type: ignore[return-value]

    return decorate


def field_help(config: type[BaseModel], name: str) -> str:
    """The help of one field of a config, for an option a command declares itself."""
    from rich.markup import escape

    return escape(next(spec.help for spec in fields(config, ()) if spec.name == name))


def _parameter(spec: FieldSpec, argument: bool) -> inspect.Parameter:
    from rich.markup import escape

    many = spec.kind in ("list", "mapping")
    # typer renders help as rich markup: "[1 to 4]" is text here, not a style; a choice's values are its metavar
    help_text = escape(spec.help_text(choices=False))
    if argument:
        kind: Any = list[str] if many else str
        info: Any = typer.Argument(help=escape(spec.description), metavar=spec.name.upper(), show_default=False)
        return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, info])
    if spec.kind == "bool":
        negative = "--no-" + spec.option.removeprefix("--")
        info = typer.Option(f"{spec.option}/{negative}", help=help_text, show_default=False)
        return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=Annotated[bool | None, info])
    metavar = "[" + "|".join(spec.choices) + "]" if spec.kind == "choice" else _METAVAR[spec.kind]
    info = typer.Option(spec.option, help=help_text, metavar=metavar, show_default=False)
    kind = list[str] | None if many else str | None
    return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind, info])
