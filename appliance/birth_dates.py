"""Dates of birth: a real calendar date, written in one of the usual numeric or spelled-out forms (English,
German, French, Italian, Spanish, Dutch), after words that say it is a birth date ("born", "DOB", "date of
birth", "geboren", "né le", "nato il", "fecha de nacimiento", "geboortedatum"...). Dates are everywhere in
ordinary text (invoices, tickets, logs), so a date without such words is never reported.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator

from appliance.national_ids import named_before

CONTEXT = ("born", "birth", "birthday", "dob", "d.o.b", "d.o.b.", "date of birth", "geboren", "geb.",
           "geburtsdatum", "né", "née", "né le", "date de naissance", "nato", "nata", "data di nascita", "nacido",
           "nacida", "fecha de nacimiento", "geboortedatum", "geboren op")

MONTHS: dict[str, int] = {}
for number, names in enumerate([
    "january jan januar janvier gennaio enero januari jänner",
    "february feb februar février fevrier febbraio febrero februari",
    "march mar märz maerz mars marzo maart",
    "april apr avril aprile abril",
    "may mai maggio mayo mei",
    "june jun juni juin giugno junio",
    "july jul juli juillet luglio julio",
    "august aug août aout agosto augustus",
    "september sep sept septembre settembre septiembre",
    "october oct oktober octobre ottobre octubre",
    "november nov novembre noviembre",
    "december dec dezember décembre decembre dicembre diciembre",
], start=1):
    for name in names.split():
        MONTHS[name] = number
_MONTH = "|".join(sorted((re.escape(m) for m in MONTHS), key=len, reverse=True))
_YEAR = r"(?:19|20)\d{2}"
_DAY = r"(?:0?[1-9]|[12]\d|3[01])"
_B, _E = r"(?<![\w/.-])", r"(?![\w/-]|\.\d)"
# each pattern names its parts: y(ear), m(onth number), b (month name), d(ay); a/b2: day or month (numeric)
PATTERNS = [
    re.compile(_B + rf"(?P<y>{_YEAR})[-/.](?P<m>0?[1-9]|1[0-2])[-/.](?P<d>{_DAY})" + _E),
    re.compile(_B + rf"(?P<a>\d{{1,2}})[/.-](?P<c>\d{{1,2}})[/.-](?P<y>{_YEAR}|\d{{2}})" + _E),
    re.compile(_B + rf"(?P<d>{_DAY})(?:st|nd|rd|th|er|\.)?\s+(?:de\s+)?(?P<b>{_MONTH})\.?,?\s+(?:de\s+)?(?P<y>{_YEAR})"
               + _E, re.IGNORECASE),
    re.compile(_B + rf"(?P<b>{_MONTH})\.?\s+(?P<d>{_DAY})(?:st|nd|rd|th)?,?\s+(?P<y>{_YEAR})" + _E, re.IGNORECASE),
]


def _real(year: int, month: int, day: int) -> bool:
    try:
        born = datetime.date(year, month, day)
    except ValueError:
        return False
    return datetime.date(1900, 1, 1) <= born <= datetime.date.today()


def _year(text: str) -> int:
    value = int(text)
    if len(text) == 2:  # a two-digit year is the most recent one not in the future
        value += 2000 if 2000 + value <= datetime.date.today().year else 1900
    return value


def _is_date(m: re.Match[str]) -> bool:
    parts = m.groupdict()
    year = _year(parts["y"])
    if parts.get("b"):
        return _real(year, MONTHS[parts["b"].lower()], int(parts["d"]))
    if parts.get("m"):
        return _real(year, int(parts["m"]), int(parts["d"]))
    first, second = int(parts["a"]), int(parts["c"])  # day-month or month-day: either reading will do
    return _real(year, second, first) or _real(year, first, second)


def find_birth_dates(text: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, value) of every date of birth in `text`."""
    if not any(ch.isdigit() for ch in text):
        return
    taken: list[tuple[int, int]] = []
    for pattern in PATTERNS:
        for m in pattern.finditer(text):
            if any(m.start() < end and start < m.end() for start, end in taken):
                continue
            if _is_date(m) and named_before(text, m.start(), CONTEXT):
                taken.append((m.start(), m.end()))
                yield m.start(), m.end(), m.group()
