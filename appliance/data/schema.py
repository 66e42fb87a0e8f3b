"""The one internal shape of training data, and the shape of a problem with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(slots=True)
class Problem:
    """One thing wrong with one row: where (file, line, field) and why, in a sentence."""

    file: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "field": self.field, "reason": self.reason}


@dataclass(slots=True)
class Record:
    """A raw row as read: a JSON object or a table row, with where it came from."""

    file: str
    line: int
    data: dict[str, Any]


@dataclass(slots=True)
class Example:
    """A conversation ready for training: system/user/assistant turns."""

    file: str
    line: int
    messages: list[dict[str, str]]
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line}"

    def text(self) -> str:
        """What the row says, for similarity: the user and assistant turns (a system prompt is
        usually shared by every row and would make them all look alike)."""
        return "\n".join(m["content"] for m in self.messages if m["role"] != "system")

    def as_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"messages": self.messages, "source": self.source}
        if self.label is not None:
            row["label"] = self.label
        if self.meta:
            row["meta"] = self.meta
        return row


class RowError(Exception):
    """Raised inside a step for a row that cannot be used; becomes a Problem."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason
