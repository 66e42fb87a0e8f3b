"""An organisation's own identifiers (employee, customer, case numbers, project code names) as PII.

A YAML file names each by its placeholder type, with a pattern or a word list, the words that must
stand before it (optional), and examples that must and must not be found. The examples are run
when the file loads: a recognizer that misses one of its own examples, or finds one of its
counter-examples, is refused with the example named, so a rule that does not do what its author
meant never touches the data.

    EMPLOYEE_ID:
      pattern: 'EMP-\\d{6}'
      context: [employee, staff]     # optional: found only after one of these words
      match: ["employee EMP-004211"]
      no_match: ["EMP-12", "employee TEMP-004211"]
    CODENAME:
      words: [Bluebird, Nightjar]    # whole words, any case
      match: ["the Bluebird rollout"]
      no_match: ["a blue bird"]
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError
from appliance.national_ids import named_before

RECOGNIZERS = "pii_recognizers.yaml"  # the copy a run keeps in its data folder
TYPE_NAME = re.compile(r"[A-Z][A-Z0-9_]{1,31}")
KEYS = {"pattern", "words", "context", "match", "no_match"}
HINT = ("Each recognizer is a TYPE: with `pattern:` (a regular expression) or `words:` (a list), optional "
        "`context:` words, and `match:` and `no_match:` example lists; see the README's PII section.")


@dataclass(frozen=True)
class Recognizer:
    type: str
    pattern: re.Pattern[str]
    context: tuple[str, ...] = ()
    rule: str = ""  # the pattern or the words, as the file gives them (the PII report shows it)
    examples: int = 0  # match and no_match examples it was proven on

    def find(self, text: str) -> Iterator[tuple[int, int, str]]:
        """(start, end, value) of each occurrence in `text`."""
        for m in self.pattern.finditer(text):
            if m.end() > m.start() and (not self.context or named_before(text, m.start(), self.context)):
                yield m.start(), m.end(), m.group()


def load(path: Path, reserved: tuple[str, ...] = ()) -> list[Recognizer]:
    """The recognizers of `path`, each proven on its own examples; a ConfigError naming the file, line and
    recognizer otherwise. `reserved`: the built-in types, which a recognizer may not reuse."""
    from appliance.config import load_settings

    data = load_settings(path, what="recognizers file")
    if not data:
        raise ConfigError(f"{path}: no recognizers in the file", HINT)
    recognizers = []
    for name, spec in data.items():
        where = f"{data.origins.get(name, path)}: {name}"
        recognizers.append(_recognizer(name, spec, where, reserved))
    return recognizers


def _recognizer(name: str, spec: Any, where: str, reserved: tuple[str, ...]) -> Recognizer:
    if not TYPE_NAME.fullmatch(name):
        raise ConfigError(f"{where}: a type is 2 to 32 capitals, digits or _, starting with a capital "
                          "(it becomes the placeholder <TYPE_1>)", HINT)
    if name in reserved:
        raise ConfigError(f"{where}: is a built-in type; name your own identifier differently", HINT)
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a mapping with pattern or words, and examples", HINT)
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})", HINT)
    if ("pattern" in spec) == ("words" in spec):
        raise ConfigError(f"{where}: give either pattern or words", HINT)
    context = tuple(str(w).lower() for w in _strings(spec, "context", where, required=False))
    if "words" in spec:
        words = _strings(spec, "words", where, required=True)
        source = r"(?<!\w)(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")(?!\w)"
        flags = int(re.IGNORECASE)
    else:
        if not isinstance(spec["pattern"], str) or not spec["pattern"]:
            raise ConfigError(f"{where}: pattern must be a regular expression in quotes", HINT)
        source, flags = spec["pattern"], 0
    try:
        pattern = re.compile(source, flags)
    except re.error as exc:
        raise ConfigError(f"{where}: the pattern is not a valid regular expression: {exc}", HINT) from exc
    if pattern.fullmatch(""):
        raise ConfigError(f"{where}: the pattern matches empty text, so it would match everywhere", HINT)
    matches, counters = _strings(spec, "match", where, required=True), _strings(spec, "no_match", where, required=True)
    rule = f"pattern {spec['pattern']}" if "pattern" in spec else f"words {', '.join(words)}"
    if context:
        rule += f", after {', '.join(context)}"
    recognizer = Recognizer(name, pattern, context, rule, len(matches) + len(counters))
    for example in matches:
        if not any(recognizer.find(example)):
            raise ConfigError(f"{where}: does not find its own example {example!r}",
                              "Fix the pattern, words or context so that each `match` example is found." +
                              (" With context words, the example must contain one before the value." if context
                               else ""))
    for example in counters:
        found = next(recognizer.find(example), None)
        if found is not None:
            raise ConfigError(f"{where}: finds {found[2]!r} in its counter-example {example!r}",
                              "Tighten the pattern (anchors such as \\b, exact lengths) or add context words.")
    return recognizer


def _strings(spec: dict[str, Any], key: str, where: str, required: bool) -> list[str]:
    values = spec.get(key)
    if values is None and not required:
        return []
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or not values or not all(isinstance(v, str | int) and str(v) for v in values):
        raise ConfigError(f"{where}: {key} must be a list of one or more texts", HINT)
    return [str(v) for v in values]
