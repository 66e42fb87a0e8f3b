"""The serving audit log: one JSON line per request, flushed as it is written.

Every line says when, who (client address), which model (name and sha256), what came back
(status, latency, token counts). Prompts and answers are kept only when the operator asks for
it, and then with every piece of PII the data stage recognises replaced by a placeholder; the
same value gets the same placeholder within one request, so a log reader can still follow it.
The file is created readable by its owner only.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from appliance.entities import light_finder
from appliance.pii import Redactor, find_pii

# Characters JSON leaves raw in strings but that line readers (Python's splitlines, many editors) take as a line
# break: escaped, so that one record is always one line.
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class AuditLog:
    def __init__(self, path: Path, log_prompts: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.log_prompts = log_prompts
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        # text the guard let through is valid Unicode; should anything else arrive, it is escaped, not lost
        self._file = os.fdopen(descriptor, "a", encoding="utf-8", errors="backslashreplace")
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str).translate(_LINE_BREAKS)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def redacted(text: str, redactor: Redactor) -> str:
    """The text with its PII replaced: the checked identifiers, and names and addresses as far as rules and the
    name gazetteer find them (the statistical model is the data stage's; a request does not wait for it)."""
    return redactor.redact(text, find_pii(text, entities=light_finder()))


def redacted_messages(messages: list[Any], redactor: Redactor) -> list[dict[str, str]]:
    """Chat messages with PII replaced, content parts flattened to their text."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        out.append({"role": str(message.get("role")), "content": redacted(str(content or ""), redactor)})
    return out
