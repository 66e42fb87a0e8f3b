"""A form made from a stage's config (appliance/fields.py): a row per field, with its label, a widget that
fits its type (a checkbox, a choice, a text box) and its help as a tooltip, so the TUI offers every setting
the CLI does. What is typed is read back as the config's settings, and checked by the config itself."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widget import Widget
from textual.widgets import Checkbox, Input, Label, Select

from appliance.fields import FieldSpec, fields, validated


class ConfigForm(Vertical):
    def __init__(self, config: type[BaseModel], *, exclude: tuple[str, ...] = ("store",),
                 only: tuple[str, ...] | None = None, values: Mapping[str, Any] | None = None,
                 labels: Mapping[str, str] | None = None, id: str | None = None) -> None:
        super().__init__(id=id, classes="config-form")
        self.config = config
        self.specs = [s for s in fields(config, exclude) if only is None or s.name in only]
        self.initial = dict(values or {})
        self.labels = dict(labels or {})

    def label_of(self, name: str) -> str:
        return self.labels.get(name) or name.replace("_", " ")

    def compose(self) -> ComposeResult:
        for spec in self.specs:
            with Horizontal(classes="field", id=f"row-{spec.name}"):
                yield Label(self.label_of(spec.name), classes="field-label")
                yield self._widget(spec, self.initial.get(spec.name, spec.default))

    def _widget(self, spec: FieldSpec, value: Any) -> Widget:
        tooltip = Text(spec.help)  # shown as written: "[a | b]" is text, not markup
        if spec.kind == "bool":
            return Checkbox("", bool(value), id=f"f-{spec.name}", compact=True, tooltip=tooltip)
        if spec.kind == "choice":
            return Select([(choice, choice) for choice in spec.choices], id=f"f-{spec.name}", compact=True,
                          allow_blank=spec.optional or spec.required, prompt="(not set)", tooltip=tooltip,
                          value=str(value) if value is not None else Select.NULL)
        return Input(spec.text(value), id=f"f-{spec.name}", placeholder=spec.description[:60], tooltip=tooltip,
                     password=spec.secret, compact=True)

    def settings(self) -> dict[str, Any]:
        """What the form holds, as the config's settings (left-empty optional fields are not set)."""
        values: dict[str, Any] = {}
        for spec in self.specs:
            widget = self.query_one(f"#f-{spec.name}")
            if isinstance(widget, Checkbox):
                values[spec.name] = widget.value
            elif isinstance(widget, Select):
                if not widget.is_blank():
                    values[spec.name] = widget.value
            elif isinstance(widget, Input):
                text = widget.value.strip()
                if text or spec.kind in ("list", "mapping") or (spec.optional and spec.name in self.initial):
                    values[spec.name] = spec.parse(text)
        return values

    def set_values(self, values: Mapping[str, Any]) -> None:
        for spec in self.specs:
            if spec.name not in values:
                continue
            widget = self.query_one(f"#f-{spec.name}")
            value = values[spec.name]
            if isinstance(widget, Checkbox):
                widget.value = bool(value)
            elif isinstance(widget, Select):
                if value is None:
                    widget.clear()
                else:
                    widget.value = str(value)
            elif isinstance(widget, Input):
                widget.value = spec.text(value)

    def validate_with(self, extra: Mapping[str, Any]) -> Any:
        """The config from the form and `extra` (what the screen adds: the store, a run's recorded settings),
        a ConfigError naming each wrong field by its label otherwise."""
        return validated(self.config, {**extra, **self.settings()}, name=self.label_of)
