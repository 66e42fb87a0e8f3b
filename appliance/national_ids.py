"""National and health identifiers, each checked the way its issuer defines it (python-stdnum).

A check digit alone does not make a number an identifier: a random 9-digit number passes the
Dutch BSN's 11-test one time in 11. So each identifier is one of two kinds:

- distinctive: the shape and the check together are rare outside the identifier (the French NIR's
  mod-97 key, the Italian codice fiscale's pattern and check letter, the Spanish DNI/NIE letter,
  the UK National Insurance number's letter rules). Found wherever they occur.
- weak: a short check (or none) over plain digits: the NHS number (mod 11), the German tax ID
  (ISO 7064 mod 11,10), the Dutch BSN (11-test), the US ITIN (a range, no check), medical record
  numbers (no rule at all). Found only after words that name them ("NHS no.", "Steuer-ID",
  "BSN", "ITIN", "MRN"), within CONTEXT_CHARS before the number and with no other number between,
  or, for a checked number, when the data's region (`--pii-region`) is the issuer's country.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

CONTEXT_CHARS = 48  # how far before a number its naming words may stand


@dataclass(frozen=True)
class IdKind:
    type: str  # the placeholder's name: <UK_NHS_1>
    region: str  # ISO country of the issuer ("" for none)
    rule: str  # what makes a match this identifier, in words (the PII report shows it)
    pattern: re.Pattern[str]
    valid: Callable[[str], bool]
    context: tuple[str, ...] = ()  # empty: distinctive, found anywhere
    region_is_enough: bool = False  # a weak, checked number found without context in its own region


def _stdnum(module: str) -> Callable[[str], bool]:
    def valid(value: str) -> bool:
        import importlib

        return bool(importlib.import_module(f"stdnum.{module}").is_valid(value))

    return valid


_NINO_PREFIX_EXCLUDED = {"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"}


def _nino(value: str) -> bool:
    """HMRC's allocation rules: no D, F, I, Q, U, V in the prefix, no O second, some pairs never issued."""
    compact = re.sub(r"\s", "", value).upper()
    return compact[:2] not in _NINO_PREFIX_EXCLUDED


def _always(value: str) -> bool:
    return True


_D = r"(?<![\w-])"  # not inside a longer word or number
_E = r"(?![\w-])"

KINDS: tuple[IdKind, ...] = (
    IdKind("FR_NIR", "FR", "15 digits: sex, birth year and month, place, order, mod-97 key",
           re.compile(_D + r"[12] ?\d{2} ?(?:0[1-9]|1[0-2]|[2-9]\d) ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}" + _E),
           _stdnum("fr.nir")),
    IdKind("IT_FISCAL_CODE", "IT", "16 letters and digits in the issuer's layout, check letter",
           re.compile(_D + r"[A-Z]{6}\d{2}[A-EHLMPRST]\d{2}[A-Z]\d{3}[A-Z]" + _E), _stdnum("it.codicefiscale")),
    IdKind("ES_DNI", "ES", "8 digits and the mod-23 check letter", re.compile(_D + r"\d{8}-?[A-Z]" + _E),
           _stdnum("es.dni")),
    IdKind("ES_NIE", "ES", "X, Y or Z, 7 digits and the mod-23 check letter",
           re.compile(_D + r"[XYZ]-?\d{7}-?[A-Z]" + _E), _stdnum("es.nie")),
    IdKind("UK_NINO", "GB", "2 letters HMRC issues, 6 digits, A to D",
           re.compile(_D + r"[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]" + _E), _nino),
    IdKind("UK_NHS", "GB", "10 digits with the mod-11 check", re.compile(_D + r"\d{3}[ -]?\d{3}[ -]?\d{4}" + _E),
           _stdnum("gb.nhs"), ("nhs", "health service", "patient"), region_is_enough=True),
    IdKind("DE_TAX_ID", "DE", "11 digits, one repeated, ISO 7064 mod 11,10 check",
           re.compile(_D + r"\d{2} ?\d{3} ?\d{3} ?\d{3}" + _E), _stdnum("de.idnr"),
           ("steuer", "idnr", "identifikationsnummer", "tax id", "tax identification", "tin"), region_is_enough=True),
    IdKind("NL_BSN", "NL", "9 digits passing the 11-test",
           re.compile(_D + r"(?:\d{4}\.?\d{2}\.?\d{3}|\d{3}[ .]?\d{3}[ .]?\d{3})" + _E), _stdnum("nl.bsn"),
           ("bsn", "burgerservicenummer", "sofinummer", "citizen service number"), region_is_enough=True),
    IdKind("US_ITIN", "US", "9XX-XX-XXXX with the IRS's group ranges",
           re.compile(_D + r"9\d{2}[- ]?\d{2}[- ]?\d{4}" + _E), _stdnum("us.itin"),
           ("itin", "taxpayer identification", "individual taxpayer")),
    IdKind("MEDICAL_RECORD", "", "6 to 10 digits, up to 3 letters before",
           re.compile(_D + r"[A-Z]{0,3}-?\d{6,10}" + _E), _always,
           ("mrn", "medical record", "patient id", "patient no", "hospital number", "chart no", "chart number")),
)
ID_TYPES = tuple(kind.type for kind in KINDS)


_SEPARATORS = re.compile(r"[\s.-]")


def named_before(text: str, start: int, words: tuple[str, ...]) -> bool:
    """A naming word stands within CONTEXT_CHARS before `start`, with no other number between it and `start`
    ("tax ID 123..., batch 456...": the tax ID is the first number, not the second)."""
    before = text[max(0, start - CONTEXT_CHARS):start].lower()
    for word in words:
        for m in re.finditer(r"(?<![a-z])" + re.escape(word) + r"(?![a-z])", before):
            if not any(ch.isdigit() for ch in before[m.end():]):
                return True
    return False


def find_ids(text: str, region: str = "US") -> Iterator[tuple[str, int, int, str]]:
    """(type, start, end, value) of every national or health identifier in `text`."""
    if not any(ch.isdigit() for ch in text):
        return
    region = region.upper()
    for kind in KINDS:
        for m in kind.pattern.finditer(text):
            value = m.group()
            if not kind.valid(_SEPARATORS.sub("", value)):
                continue
            if kind.context and not named_before(text, m.start(), kind.context) \
                    and not (kind.region_is_enough and region == kind.region):
                continue
            yield kind.type, m.start(), m.end(), value
