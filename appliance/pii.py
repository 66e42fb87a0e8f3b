"""PII and secrets: find them, count them, redact them with consistent typed placeholders.

Checksums cut false alarms: card numbers must pass Luhn and start like a card, IBANs must pass
mod-97 (python-stdnum), phone numbers must be valid numbers for their region (phonenumbers, the
port of Google's libphonenumber), national and health identifiers must pass their issuer's check
(national_ids.py); names, addresses, places and organisations come from entities.py. Raw values
leave these modules only inside the text being processed: summaries hold masked samples only.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.birth_dates import find_birth_dates
from appliance.entities import ENTITY_TYPES
from appliance.national_ids import ID_TYPES, find_ids

if TYPE_CHECKING:
    from appliance.entities import Entity, EntityFinder
    from appliance.recognizers import Recognizer

PII_TYPES = ("PRIVATE_KEY", "URL_CREDENTIALS", "API_KEY", "EMAIL", "IBAN", "CREDIT_CARD", "SSN", *ID_TYPES,
             "DATE_OF_BIRTH", "PHONE", "IP_ADDRESS", *ENTITY_TYPES.values())


@dataclass(slots=True, frozen=True)
class Finding:
    type: str
    start: int
    end: int
    value: str


_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])"
)
_URL_CREDS = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]+:[^\s@/]+@[^\s/?#]+")
_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|[\s\S]*)"
)
_API_KEYS = [re.compile(p) for p in (
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}\b",
    r"\bgithub_pat_[A-Za-z0-9_]{50,}\b",
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b",
    r"\bAIza[0-9A-Za-z_-]{35}(?![\w-])",
    r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}(?![\w-])",
    r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}\b",
    r"\bglpat-[A-Za-z0-9_-]{20,}(?![\w-])",
    r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}(?![\w-])",
)]
_BEARER = re.compile(r"(?i)\bbearer\s+([A-Za-z0-9._~+/-]{20,}=*)")
_ASSIGNED_SECRET = re.compile(
    r"(?i)\b(?:api[_-]?key|apikey|secret(?:[_-]?key)?|access[_-]?key|auth[_-]?token|token|passw(?:or)?d|pwd)"
    r"\b[\"']?\s*[:=]\s*[\"']?([^\s\"',;]{8,})"
)
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{1,4}){3,8}\b")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_SSN = re.compile(r"(?<![\d-])(\d{3})[- ](\d{2})[- ](\d{4})(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]*\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_DIGITS = re.compile(r"\d")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_prefix(digits: str) -> bool:
    two, four = int(digits[:2]), int(digits[:4])
    return (digits[0] == "4" or 51 <= two <= 55 or 2221 <= four <= 2720 or two in (34, 37, 36, 38, 35, 62, 65)
            or digits.startswith("6011") or 644 <= int(digits[:3]) <= 649 or 300 <= int(digits[:3]) <= 305)


def _cards(text: str) -> Iterator[Finding]:
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and _card_prefix(digits) and _luhn(digits):
            yield Finding("CREDIT_CARD", m.start(), m.end(), m.group())


def _ibans(text: str) -> Iterator[Finding]:
    from stdnum import iban

    for m in _IBAN.finditer(text):
        value = m.group()
        while value:  # the pattern may run into a following word: trim groups until valid
            if iban.is_valid(value):
                yield Finding("IBAN", m.start(), m.start() + len(value), value)
                break
            if " " not in value:
                break
            value = value.rsplit(" ", 1)[0]


def _ssns(text: str) -> Iterator[Finding]:
    for m in _SSN.finditer(text):
        area, group, serial = m.groups()
        if area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000":
            yield Finding("SSN", m.start(), m.end(), m.group())


def _ips(text: str) -> Iterator[Finding]:
    for m in _IPV4.finditer(text):
        if all(int(octet) <= 255 for octet in m.group().split(".")):
            yield Finding("IP_ADDRESS", m.start(), m.end(), m.group())
    if "::" in text or text.count(":") >= 5:
        for m in _IPV6.finditer(text):
            candidate = m.group()
            if sum(c.isalnum() for c in candidate) < 3:
                continue
            try:
                ipaddress.IPv6Address(candidate)
            except ValueError:
                continue
            yield Finding("IP_ADDRESS", m.start(), m.end(), candidate)


def _secrets(text: str) -> Iterator[Finding]:
    for m in _PRIVATE_KEY.finditer(text):
        yield Finding("PRIVATE_KEY", m.start(), m.end(), m.group())
    for m in _URL_CREDS.finditer(text):
        yield Finding("URL_CREDENTIALS", m.start(), m.end(), m.group())
    for pattern in _API_KEYS:
        for m in pattern.finditer(text):
            yield Finding("API_KEY", m.start(), m.end(), m.group())
    for pattern in (_BEARER, _ASSIGNED_SECRET):
        for m in pattern.finditer(text):
            yield Finding("API_KEY", m.start(1), m.end(1), m.group(1))


def _emails(text: str) -> Iterator[Finding]:
    if "@" in text:
        for m in _EMAIL.finditer(text):
            yield Finding("EMAIL", m.start(), m.end(), m.group())


def _phones(region: str) -> Callable[[str], Iterator[Finding]]:
    def find(text: str) -> Iterator[Finding]:
        if len(_DIGITS.findall(text)) < 7:
            return
        import phonenumbers

        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            yield Finding("PHONE", match.start, match.end, match.raw_string)

    return find


def _birth_dates(text: str) -> Iterator[Finding]:
    for start, end, value in find_birth_dates(text):
        yield Finding("DATE_OF_BIRTH", start, end, value)


def _national(region: str) -> Callable[[str], Iterator[Finding]]:
    def find(text: str) -> Iterator[Finding]:
        for kind, start, end, value in find_ids(text, region):
            yield Finding(kind, start, end, value)

    return find


def _own(recognizers: Sequence[Recognizer]) -> Callable[[str], Iterator[Finding]]:
    def find(text: str) -> Iterator[Finding]:
        for recognizer in recognizers:
            for start, end, value in recognizer.find(text):
                yield Finding(recognizer.type, start, end, value)

    return find


def _entities(entities: EntityFinder | Sequence[Entity] | None) -> Callable[[str], Iterator[Finding]]:
    def find(text: str) -> Iterator[Finding]:
        if entities is None:
            return
        for entity in entities.find(text) if not isinstance(entities, Sequence) else entities:
            yield Finding(entity.type, entity.start, entity.end, entity.value)

    return find


def find_pii(text: str, region: str = "US", own: Sequence[Recognizer] = (),
             entities: EntityFinder | Sequence[Entity] | None = None) -> list[Finding]:
    """All PII in `text`, without overlaps (earlier detectors win: a card number is not a phone, an NHS number
    is not a phone, and a French NIR, whose mod-97 key is the stronger check, is not a card). `own`: the
    organisation's recognizers (recognizers.py), which come right after secrets and e-mail addresses.
    `entities`: names, addresses, places, organisations (entities.py), last: what a checked detector found
    is not also a name; either the finder, or what it found in this text (a batch's share)."""
    found: list[Finding] = []
    taken: list[tuple[int, int]] = []
    for detector in (_secrets, _emails, _own(own), _ibans, _national(region), _birth_dates, _cards, _ssns, _ips,
                     _phones(region), _entities(entities)):
        for finding in detector(text):
            if any(finding.start < end and start < finding.end for start, end in taken):
                continue
            found.append(finding)
            taken.append((finding.start, finding.end))
    return sorted(found, key=lambda f: f.start)


def mask(value: str) -> str:
    """A shape-keeping mask that shows no more than the first character."""
    if value.startswith("-----BEGIN"):
        return f"-----BEGIN ... PRIVATE KEY----- ({len(value)} chars)"
    shown = "".join(ch if i == 0 or not ch.isalnum() else "*" for i, ch in enumerate(value[:32]))
    return shown + ("…" if len(value) > 32 else "")


def _canonical(finding: Finding) -> str:
    if finding.type in ("PHONE", "CREDIT_CARD", "IBAN", "SSN", *ID_TYPES):
        return re.sub(r"[^0-9A-Za-z]", "", finding.value).upper()
    if finding.type in ENTITY_TYPES.values():  # "Sara  Rossi" and "SARA ROSSI" are one person
        return " ".join(finding.value.split()).casefold()
    return finding.value.lower() if finding.type == "EMAIL" else finding.value


@dataclass
class PiiSummary:
    counts: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=dict)
    rows_with_pii: int = 0

    def add(self, findings: list[Finding]) -> None:
        if findings:
            self.rows_with_pii += 1
        for finding in findings:
            self.counts[finding.type] += 1
            samples = self.samples.setdefault(finding.type, [])
            if len(samples) < 3:
                samples.append(mask(finding.value))

    def as_dict(self) -> dict[str, object]:
        return {"rows_with_pii": self.rows_with_pii, "counts": dict(sorted(self.counts.items())),
                "masked_samples": self.samples}


class Redactor:
    """Placeholders that stay the same for the same value within one conversation."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str], int] = {}
        self._next: Counter[str] = Counter()

    def placeholder(self, finding: Finding) -> str:
        key = (finding.type, _canonical(finding))
        if key not in self._ids:
            self._next[finding.type] += 1
            self._ids[key] = self._next[finding.type]
        return f"<{finding.type}_{self._ids[key]}>"

    def redact(self, text: str, findings: list[Finding]) -> str:
        out, last = [], 0
        for finding in findings:
            out.append(text[last:finding.start])
            out.append(self.placeholder(finding))
            last = finding.end
        out.append(text[last:])
        return "".join(out)
