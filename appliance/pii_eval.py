"""The labelled set PII detection is measured on, and the measurement.

Every detector's precision and recall per type, measured on synthetic text whose PII is known:
valid values of each type, written the ways people write them, in ordinary sentences, next to
look-alikes that must not be reported (numbers with a purpose, wrong check digits, prefixes never
issued, identifiers nothing names as such). The data stage measures the detectors of this
installation and the data report carries the numbers (bench/pii.py prints them; tests/test_pii.py
holds them to their levels). With entity recognition it takes about 2 s, so a store keeps each
measurement, under a key of everything it depends on: the detectors' source, the libraries' and
the models' versions, and the settings (`stored`).
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from stdnum import iban as stdnum_iban

from appliance.pii import PII_TYPES, find_pii

if TYPE_CHECKING:
    from appliance.recognizers import Recognizer
    from appliance.records import PiiDetector

SEED = 42
LABELLED_REGION = "US"  # the labelled set's phone numbers are written the US way; it is measured as such


def measured_on(languages: Sequence[str] = ("en",)) -> str:
    texts, truth = labelled_sample(tuple(languages))
    return (f"the appliance's labelled set: {len(truth)} values in {len(texts)} texts with look-alikes, "
            f"measured with region {LABELLED_REGION}, names in {', '.join(languages)} text (pii_eval.py)")

CONTEXTS = ["Please contact {} about the outage.", "Details: {}.", "{} was in the log", "(see {})",
            "The customer wrote: my details are {} thanks", "Forwarding {}; escalate if needed."]


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    for check in string.digits:
        digits = body + check
        total = sum((int(d) * 2 - 9 if int(d) * 2 > 9 else int(d) * 2) if i % 2 else int(d)
                    for i, d in enumerate(reversed(digits)))
        if total % 10 == 0:
            return digits
    raise AssertionError


def _positives(rng: random.Random) -> dict[str, list[str]]:
    hexs = "0123456789abcdef"
    cards = []
    for prefix, length in [("4", 16), ("51", 16), ("37", 15), ("6011", 16)] * 5:
        digits = _luhn_complete(prefix, length, rng)
        cards.append(" ".join(digits[i:i + 4] for i in range(0, len(digits), 4)) if rng.random() < 0.5 else digits)
    ibans = []
    for country, length in [("DE", 18), ("GB", 18), ("FR", 23), ("NL", 14)] * 5:
        if country == "GB":
            bban = "NWBK" + "".join(rng.choice(string.digits) for _ in range(14))
        elif country == "NL":
            bban = "ABNA" + "".join(rng.choice(string.digits) for _ in range(10))
        else:
            bban = "".join(rng.choice(string.digits) for _ in range(length))
        number = country + "00" + bban
        number = country + stdnum_iban.calc_check_digits(number) + bban
        ibans.append(" ".join(number[i:i + 4] for i in range(0, len(number), 4)) if rng.random() < 0.5 else number)
    return {
        "EMAIL": [f"{rng.choice(['ana', 'j.smith', 'ops+alerts', 'kim_lee'])}{i}@"
                  f"{rng.choice(['corp.example.com', 'bank.de', 'hospital.org'])}" for i in range(20)],
        "PHONE": [rng.choice(["({a}) {b}-{c}", "{a}-{b}-{c}", "+1 {a} {b} {c}", "+1-{a}-{b}-{c}"]).format(
                      a=rng.choice(["212", "415", "312", "617", "206"]), b=rng.randint(201, 989),
                      c=f"{rng.randint(0, 9999):04d}") for _ in range(16)]
        + ["+44 20 7946 0958", "+49 30 901820", "+33 1 42 68 53 00", "+31 20 624 1111"],
        "CREDIT_CARD": cards,
        "IBAN": ibans,
        "SSN": [f"{rng.randint(1, 665):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}" for _ in range(20)],
        "IP_ADDRESS": [f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
                       for _ in range(16)] + ["2001:db8::8a2e:370:7334", "fe80::1ff:fe23:4567:890a", "::1",
                                              "2001:0db8:85a3:0000:0000:8a2e:0370:7334"],
        "URL_CREDENTIALS": [f"{rng.choice(['https', 'postgres', 'ftp'])}://svc{i}:{rng.randint(10**7, 10**8)}pw@"
                            f"host{i}.internal" for i in range(20)],
        "API_KEY": ["AKIA" + "".join(rng.choice(string.ascii_uppercase + "234567") for _ in range(16))
                    for _ in range(5)]
        + ["ghp_" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(36)) for _ in range(4)]
        + ["xoxb-" + "".join(rng.choice(string.digits) for _ in range(12)) + "-" + "".join(
            rng.choice(string.ascii_letters) for _ in range(24)) for _ in range(3)]
        + ["AIza" + "".join(rng.choice(string.ascii_letters + string.digits + "_-") for _ in range(35))
           for _ in range(3)]
        + ["sk-proj-" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(40)) for _ in range(3)]
        + ["eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
           "sk_live_" + "".join(rng.choice(hexs) for _ in range(24))],
        "PRIVATE_KEY": ["-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(
            "".join(rng.choice(string.ascii_letters + string.digits + "+/") for _ in range(64)) for _ in range(4))
            + "\n-----END RSA PRIVATE KEY-----" for _ in range(5)],
    }


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _valid(rng: random.Random, make: Callable[[random.Random], str], valid: Callable[[str], bool]) -> str:
    while True:
        value = make(rng)
        if valid(value):
            return value


def _national_ids(rng: random.Random) -> dict[str, list[str]]:
    """Valid identifiers of each kind, written the ways people write them."""
    from stdnum.de import idnr
    from stdnum.es import dni, nie
    from stdnum.fr import nir
    from stdnum.gb import nhs
    from stdnum.iso7064 import mod_11_10
    from stdnum.it import codicefiscale
    from stdnum.nl import bsn
    from stdnum.us import itin

    def nir_value(r: random.Random) -> str:
        body = f"{r.choice('12')}{r.randint(40, 99)}{r.randint(1, 12):02d}{r.randint(1, 95):02d}{_digits(r, 6)}"
        key = nir.calc_check_digits(body)
        return f"{body[0]} {body[1:3]} {body[3:5]} {body[5:7]} {body[7:10]} {body[10:13]} {key}" \
            if r.random() < 0.5 else body + key

    def cf_value(r: random.Random) -> str:
        body = ("".join(r.choice(string.ascii_uppercase) for _ in range(6)) + f"{r.randint(40, 99)}"
                + r.choice("ABCDEHLMPRST") + f"{r.randint(1, 71):02d}" + r.choice("ABCDEFGHILM") + _digits(r, 3))
        return body + str(codicefiscale.calc_check_digit(body))

    def nhs_value(r: random.Random) -> str:
        digits = _digits(r, 9)
        value = digits + str((11 - sum(int(d) * (10 - i) for i, d in enumerate(digits)) % 11) % 11)
        return f"{value[:3]} {value[3:6]} {value[6:]}" if r.random() < 0.5 else value

    def nino_value(r: random.Random) -> str:
        first, second = r.choice("ABCEGHJKLMNOPRSTWXYZ"), r.choice("ABCEGHJKLMNPRSTWXYZ")
        number = _digits(r, 6)
        return f"{first}{second} {number[:2]} {number[2:4]} {number[4:]} {r.choice('ABCD')}" if r.random() < 0.5 \
            else f"{first}{second}{number}{r.choice('ABCD')}"

    def idnr_value(r: random.Random) -> str:
        body = str(r.randint(1, 9)) + _digits(r, 9)
        return body + str(mod_11_10.calc_check_digit(body))

    def bsn_value(r: random.Random) -> str:
        body = _digits(r, 8)
        check = sum(int(d) * (9 - i) for i, d in enumerate(body)) % 11
        return body + str(check) if check < 10 else body + "x"

    def itin_value(r: random.Random) -> str:
        return f"9{_digits(r, 2)}-{r.choice([70, 75, 80, 88, 90, 94, 99, 50, 65])}-{_digits(r, 4)}"

    return {
        "FR_NIR": [_valid(rng, nir_value, nir.is_valid) for _ in range(8)],
        "IT_FISCAL_CODE": [_valid(rng, cf_value, codicefiscale.is_valid) for _ in range(8)],
        "ES_DNI": [(lambda d: d + dni.calc_check_digit(d))(_digits(rng, 8)) for _ in range(8)],
        "ES_NIE": [(lambda d: d + nie.calc_check_digit(d))(rng.choice("XYZ") + _digits(rng, 7)) for _ in range(8)],
        "UK_NINO": [nino_value(rng) for _ in range(8)],
        "UK_NHS": [_valid(rng, nhs_value, nhs.is_valid) for _ in range(8)],
        "DE_TAX_ID": [_valid(rng, idnr_value, idnr.is_valid) for _ in range(8)],
        "NL_BSN": [_valid(rng, bsn_value, bsn.is_valid) for _ in range(8)],
        "US_ITIN": [_valid(rng, itin_value, itin.is_valid) for _ in range(8)],
        "MEDICAL_RECORD": [rng.choice(["", "MR", "H-"]) + _digits(rng, rng.randint(6, 10)) for _ in range(8)],
    }


# How the identifiers that are plain digits get named in text (without such words they are not reported).
NAMED = {
    "UK_NHS": ["NHS number {}", "the patient's NHS no. is {}"],
    "DE_TAX_ID": ["Steuer-ID: {}", "steuerliche Identifikationsnummer {}", "tax ID {}"],
    "NL_BSN": ["BSN {}", "burgerservicenummer: {}"],
    "US_ITIN": ["ITIN {}", "individual taxpayer identification number {}"],
    "MEDICAL_RECORD": ["MRN {}", "medical record number: {}", "patient ID {}"],
    "DATE_OF_BIRTH": ["born on {}", "DOB: {}", "date of birth {}", "geboren am {}", "née le {}",
                      "data di nascita: {}", "fecha de nacimiento {}"],
}


def _birth_dates(rng: random.Random) -> list[str]:
    """Real dates in the forms people write them in."""
    months = ["January", "Feb", "March", "Apr", "mai", "Juni", "luglio", "agosto", "September", "Oct.", "noviembre",
              "December"]
    out = []
    for n in range(20):
        year, month, day = rng.randint(1930, 2010), rng.randint(1, 12), rng.randint(1, 28)
        form = n % 6
        out.append([f"{year}-{month:02d}-{day:02d}", f"{day:02d}/{month:02d}/{year}", f"{month}/{day}/{year}",
                    f"{day}.{month}.{year}", f"{day} {months[month - 1]} {year}",
                    f"{months[month - 1]} {day}, {year}"][form])
    return out


# Look-alikes that must not be reported: numbers with a purpose, and near misses.
NEGATIVES = [
    "Order 1234567890123 shipped", "invoice 2024-11-28", "build v1.2.3.4.5", "at 10:30:45 UTC",
    "ISBN 978-3-16-148410-0", "ticket 555-1234", "zip 94103", "price $1,234.56", "colour #ff00aa",
    "MAC 00:1A:2B:3C:4D:5E", "uuid 123e4567-e89b-12d3-a456-426614174000",
    "commit 3f786850e387550fdab836ed7e6dc881de23001b", "card 4111 1111 1111 1112",
    "IBAN DE00 3704 0044 0532 0130 00", "SSN 000-12-3456", "SSN 666-45-6789", "IP 999.10.10.10",
    "module sk-learn is installed", "ratio 3:4:5", "call extension 4412", "room 4.12.1",
    "version 2.0.1 of the tool", "see RFC 1918", "the year 1984", "account no. 00123",
    # identifiers with a wrong check, a prefix never issued, or digits that nothing names as an identifier
    "NHS number 110 293 8476", "BSN 111222334", "Steuer-ID 36574261890", "NIR 2 95 10 99 126 111 94",
    "codice fiscale RCCMNL83S18D969A", "DNI 54362315A", "NIE X2482300A", "NI number BG 12 34 56 A",
    "ITIN 912-45-1234", "order 1102938475", "reference 111222333", "batch 36574261809", "serial 00123456",
    # dates that are not anyone's birth, and birth words without a whole date
    "meeting on 17 May 1990", "released 05/17/1990", "DOB field left empty", "born in 1990", "renewal 2023-02-30",
]


# People's names from many cultures and scripts, as English text writes them (none is taken from the
# gazetteer's source: the gazetteer knows some of them, as it would in real text, and not others).
PEOPLE = [
    "Sara Rossi", "Oluwaseun Adeyemi", "Priya Natarajan", "Zhang Wei", "Kateryna Shevchenko", "Mohammed Al-Farsi",
    "Jean-Pierre Dubois", "María García López", "Siobhan O'Connor", "Nguyen Van An", "Hiroshi Tanaka",
    "Kim Min-jun", "Aroha Ngata", "Björn Andersson", "Fatima Zahra Benali", "Rahul Sharma", "Chidi Okonkwo",
    "Kwame Mensah", "Ingrid Johansson", "Dmitri Ivanov", "Ayşe Yılmaz", "Lakshmi Iyer", "Carlos Mendoza",
    "Anna Kowalczyk", "Emma Thompson", "James O'Neill", "Giulia Bianchi", "Lars Jensen", "Hannah Goldberg",
    "Thabo Nkosi", "Ahmed Hassan", "Yuki Sato", "Olga Petrova", "Pedro Alves", "Sofia Papadopoulos", "Nkechi Eze",
    "Rajesh Kumar", "Leilani Kahale", "Mateo Fernández", "Amara Diallo", "Hamid Karimi", "Elif Demir",
    "Tuan Pham", "Grace Wanjiru", "Saoirse Murphy", "Jakub Nowak", "Aisha Bello", "Ravi Menon",
    "Hye-jin Park", "Bogdan Popescu", "Иван Петров", "Γιώργος Παπαδόπουλος",
]
TITLED = ["Dr. Okafor", "Mrs. Lindqvist", "Mr Abernathy", "Prof. Nakamura", "Ms Delacroix", "Herr Schmidt",
          "Mme Lefebvre", "Sra. Gutiérrez"]
NAME_CONTEXTS = [
    "Please call {} back about the refund.", "{} reported the outage at nine.", "Thanks, {}",
    "I spoke with {} from accounts yesterday.", "The patient {} was discharged on Friday.",
    "Dear {}, your appointment is confirmed.", "Meeting notes: {} will send the slides.",
    "Forward the contract to {} before noon.", "Ticket opened by {} for the billing team.",
    "My name is {} and I need a new badge.", "Approved by {} on behalf of the board.", "cc {}",
]
# Postal addresses in the formats of several countries.
ADDRESSES = [
    "221B Baker Street, London NW1 6XE", "10 Downing Street, London SW1A 2AA", "42 Wallaby Way, Sydney NSW 2000",
    "1600 Pennsylvania Avenue NW, Washington, DC 20500", "350 Fifth Avenue, New York, NY 10118",
    "17 Elm Rd, Springfield, IL 62704", "8 Riverside Drive, Apt 4B", "77 Harbour Lane, Cork",
    "Hauptstraße 5, 10115 Berlin", "Bahnhofstr. 12a, 8001 Zürich", "Kerkstraat 12, 1017 GC Amsterdam",
    "Prinsengracht 263, Amsterdam", "12 rue de la Paix, 75002 Paris", "8 avenue des Champs-Élysées, 75008 Paris",
    "Via Roma 10, 00184 Roma", "Piazza Navona 45, Roma", "Calle Mayor 5, 28013 Madrid",
    "Avenida de la Constitución 20, Sevilla", "Rua Augusta 100, Lisboa", "3 Kings Road, Brighton",
    "55 Queen Street West, Toronto", "Am Ring 4, 50667 Köln",
]
ADDRESS_CONTEXTS = ["Please ship the replacement to {}.", "Our new office is at {} from May.",
                    "The tenant lives at {}; rent is overdue.", "Adresse: {}", "Deliver to {} before Friday."]
# Look-alikes of names and addresses: products, companies, eponyms, streets without a house, ordinary words.
ENTITY_NEGATIVES = [
    "Our Adobe Acrobat renewal failed.", "Jira crashes when exporting to PDF.", "The Ford Focus needs new tyres.",
    "Baker Street Capital announced results.", "Morgan Stanley raised its forecast.", "We moved the Tableau "
    "dashboards.", "Victoria Station was closed all weekend.", "May I ask for an update?", "Will the patch land "
    "in June?", "Mark the ticket as resolved.", "Grace period ends Friday.", "Salesforce sync failed again.",
    "Download Microsoft Teams from the portal.", "The Parkinson's disease clinic moved.", "Hodgkin lymphoma "
    "follow-up is booked.", "The Nobel Prize lecture is online.", "Route 66 is closed near the bridge.",
    "Oxford Street is busy on Saturdays.", "Level 5 Road Safety report attached.", "Room 12 Main Building is "
    "free.", "Version 10 Street View images are stale.", "The Georgia office closes early.", "Apple Pay is not "
    "accepted.", "Ticket 4412 Park Avenue project is on hold.", "The Johnson & Johnson shipment arrived.",
    "Chase Bank called about the card.", "The Lincoln Memorial tour is full.", "Zoom keeps freezing.",
    "Send it via Teams 2 times.", "The launch will take place Monday 5 June.", "During 2023 we grew.",
    "Hi Power BI users, the dashboards moved.", "Thanks, Tableau Server admins.", "Spring 2024 release notes.",
]


# French text: names as French writes them, and French look-alikes (measured when French is one of the languages).
FRENCH_PEOPLE = ["Camille Martin", "Jean-Baptiste Lefèvre", "Mamadou Diop", "Amélie Rousseau", "Théo Girard",
                 "Chloé Fontaine", "Karim Haddad", "Élodie Mercier", "Nicolas Lambert", "Inès Bouchard",
                 "Antoine Moreau", "Fatou Ndiaye", "Hugo Marchand", "Léa Dubois", "Julien Roux", "Monsieur Perrin"]
FRENCH_CONTEXTS = ["Veuillez rappeler {} demain au sujet du remboursement.", "{} a signalé la panne ce matin.",
                   "Merci, {}", "Le patient {} est sorti vendredi.", "Bonjour {}, votre rendez-vous est confirmé.",
                   "J'ai parlé avec {} de la comptabilité.", "Je m'appelle {} et j'ai besoin d'un badge."]
FRENCH_NEGATIVES = ["La Renault Clio est au garage.", "Le Crédit Agricole a appelé hier.", "La Tour Eiffel est "
                    "fermée.", "Le syndrome de Gilles de la Tourette est suivi ici.", "La rue Victor Hugo est fermée.",
                    "Merci pour votre aide.", "Le lycée Jean Moulin ouvre lundi.", "Nous utilisons Microsoft Teams.",
                    "La gare Saint-Lazare est en travaux."]


@cache
def labelled_sample(languages: tuple[str, ...] = ("en",)) -> tuple[list[str], list[tuple[int, str, str]]]:
    """Texts and their labelled values (text index, type, value); French texts when French is among `languages`."""
    rng = random.Random(SEED)
    texts: list[str] = []
    truth: list[tuple[int, str, str]] = []
    for kind, values in {**_positives(rng), **_national_ids(rng), "DATE_OF_BIRTH": _birth_dates(rng)}.items():
        for value in values:
            text = rng.choice(NAMED[kind]).format(value) if kind in NAMED else value
            texts.append(rng.choice(CONTEXTS).format(text) + " " + rng.choice(NEGATIVES))
            truth.append((len(texts) - 1, kind, value))
    texts.extend(NEGATIVES)
    for kind, values, contexts in (("PERSON", PEOPLE + TITLED, NAME_CONTEXTS),
                                   ("ADDRESS", ADDRESSES, ADDRESS_CONTEXTS)):
        for value in values:
            texts.append(rng.choice(contexts).format(value) + " " + rng.choice(ENTITY_NEGATIVES))
            # a title is part of what is said, not of the name: "Dr. Okafor" finds "Okafor"
            truth.append((len(texts) - 1, kind, value.split(None, 1)[1] if value in TITLED else value))
    texts.extend(ENTITY_NEGATIVES)
    if "fr" in languages:
        for value in FRENCH_PEOPLE:
            texts.append(rng.choice(FRENCH_CONTEXTS).format(value) + " " + rng.choice(FRENCH_NEGATIVES))
            truth.append((len(texts) - 1, "PERSON", value.split(None, 1)[1] if value.startswith("Monsieur") else value))
        texts.extend(FRENCH_NEGATIVES)
    return texts, truth




MEASURED_ENTITIES = ("names", "addresses")  # the entity kinds the labelled set labels
WHOLE = ("PERSON", "ADDRESS")  # found only when every letter and digit of it is covered: "Rossi" leaves "Sara"

Found = tuple[str, int, int, str]  # type, start, end, value


def score(texts: Sequence[str], truth: Sequence[tuple[int, str, str]], found: Sequence[Sequence[Found]],
          types: Sequence[str]) -> dict[str, tuple[float, float, int]]:
    """Precision, recall and number of labelled values per type of `types`, of what a detector `found` in each
    text. A finding is right when it is of a labelled value's type and overlaps that value; a labelled value is
    found when a finding of its type holds it or lies within it (for WHOLE types: when findings cover it all)."""
    tp = dict.fromkeys(types, 0)
    fp, fn, n = dict(tp), dict(tp), dict(tp)
    expected: dict[int, list[tuple[str, int, int, str]]] = {}
    for i, kind, value in truth:
        if kind in tp:
            at = texts[i].find(value)
            expected.setdefault(i, []).append((kind, at, at + len(value), value))
            n[kind] += 1
    for i in range(len(texts)):
        labelled = expected.get(i, [])
        for kind, start, end, _value in found[i]:
            if kind not in tp:
                continue
            if any(k == kind and start < e and s < end for k, s, e, _ in labelled):
                tp[kind] += 1
            else:
                fp[kind] += 1
        for kind, start, end, value in labelled:
            mine = [(s, e, v) for k, s, e, v in found[i] if k == kind]
            if kind in WHOLE:
                hit = all(any(s <= j < e for s, e, _ in mine) for j in range(start, end) if texts[i][j].isalnum())
            else:
                hit = any(value in v or v in value for _, _, v in mine)
            fn[kind] += 0 if hit else 1
    return {kind: (round(tp[kind] / max(1, tp[kind] + fp[kind]), 4), round((n[kind] - fn[kind]) / max(1, n[kind]), 4),
                   n[kind]) for kind in types if n[kind]}


@cache
def measure(region: str = "US", entities: tuple[str, ...] = MEASURED_ENTITIES, languages: tuple[str, ...] = ("en",)
            ) -> dict[str, tuple[float, float, int]]:
    """Precision, recall and number of labelled values per type, on the labelled set (`entities`: the entity
    kinds that run; a labelled type whose kind does not run is not measured; `languages`: the models that read
    the text, and the languages of the names measured)."""
    from appliance.entities import ENTITY_TYPES, EntityFinder

    texts, truth = labelled_sample(languages)
    kinds = tuple(k for k in entities if k in MEASURED_ENTITIES)
    off = {ENTITY_TYPES[k] for k in ENTITY_TYPES if k not in kinds}
    finder = EntityFinder(kinds, languages=languages) if kinds else None
    named = [c[0] for c in finder.find_conversations([[t] for t in texts])] if finder else [None] * len(texts)
    found = [[(f.type, f.start, f.end, f.value) for f in find_pii(text, region, (), named[i])]
             for i, text in enumerate(texts)]
    return score(texts, truth, found, [t for t in PII_TYPES if t not in off])


# What a measurement depends on besides its settings: the detectors' code, and the libraries and models they run
MEASURED_CODE = ("pii.py", "pii_eval.py", "entities.py", "national_ids.py", "birth_dates.py")
MEASURED_LIBRARIES = ("spacy", "thinc", "blis", "numpy", "Faker", "phonenumbers", "python-stdnum")


def measurement_key(region: str, entities: tuple[str, ...], languages: tuple[str, ...]) -> str:
    """A hash of everything `measure` depends on: its arguments, the source of the detectors, the versions of the
    libraries they use and the files of the entity models (pinned by hash in entities.MODELS)."""
    from importlib import metadata

    from appliance.entities import MODELS

    here = Path(__file__).parent
    versions: dict[str, str | None] = {}
    for name in MEASURED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    parts = {"region": region, "entities": sorted(entities), "languages": sorted(languages), "libraries": versions,
             "models": sorted(MODELS[language].sha256 for language in languages if language in MODELS),
             "code": {name: hashlib.sha256((here / name).read_bytes()).hexdigest() for name in MEASURED_CODE}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def stored(cache_dir: Path | None, region: str = "US", entities: tuple[str, ...] = MEASURED_ENTITIES,
           languages: tuple[str, ...] = ("en",)) -> dict[str, tuple[float, float, int]]:
    """`measure`, kept in `cache_dir` (a store's cache) for the next job that measures the same detectors; measured
    afresh when anything it depends on changed, when the kept file does not read back, or without a folder."""
    from appliance.fsutil import atomic_write_text

    if cache_dir is None:
        return measure(region, entities, languages)
    key = measurement_key(region, entities, languages)
    path = cache_dir / f"pii-measure-{key[:16]}.json"
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept["key"] == key:
            return {kind: (float(p), float(r), int(n)) for kind, (p, r, n) in kept["measured"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not kept yet, or not readable: measured again below
    measured = measure(region, entities, languages)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"key": key, "measured": measured}, sort_keys=True))
    except OSError:
        pass  # a store that cannot keep it measures again next time
    return measured


# What each detector is, in the words of the report (the national identifiers: national_ids.KINDS).
_METHODS: list[tuple[tuple[str, ...], str, str]] = [
    (("PRIVATE_KEY", "URL_CREDENTIALS", "API_KEY"), "key and token formats (PEM keys, AWS, GitHub, Slack, Google, "
     "OpenAI, Stripe, GitLab, JWT), passwords in URLs, bearer tokens and assigned secrets", ""),
    (("EMAIL",), "address pattern", ""),
    (("IBAN",), "pattern and the ISO 13616 mod-97 check", "python-stdnum"),
    (("CREDIT_CARD",), "13 to 19 digits with an issuer prefix and the Luhn check", ""),
    (("SSN",), "3-2-4 digits with the SSA's area, group and serial rules", ""),
    (("PHONE",), "numbers valid for their country (libphonenumber's rules), the region's when no country code",
     "phonenumbers"),
    (("IP_ADDRESS",), "IPv4 and IPv6 addresses that parse", ""),
    (("DATE_OF_BIRTH",), "a real calendar date, numeric or spelled out (English, German, French, Italian, Spanish, "
     "Dutch), only after words that say it is a birth date ('born', 'DOB', 'geboren', 'né le', 'nato il'...)", ""),
]
NOT_DETECTED = [
    "dates of birth that no word marks as such", "national identifiers of countries not listed here",
    "an organisation's own identifiers that no rules file describes", "PII written out in words or split across "
    "messages",
]
_ENTITY_GAPS = {
    "names": ["names in scripts without capital letters (Arabic, Hebrew, Chinese, Japanese, Korean, Thai) unless "
              "an honorific follows (先生, さん, 씨)", "a given name alone with no title or introduction ('ask "
              "Thabo')", "names the model misses and no gazetteer knows, outside an introduction"],
    "addresses": ["addresses without a house number, and street words other than the listed ones",
                  "PO boxes and addresses written over several lines"],
}
_ENTITY_MISSING = {"names": "people's names", "addresses": "postal addresses",
                   "locations": "places (towns, countries, buildings)", "organisations": "organisations' names"}


def not_detected(entities: Sequence[str] = ()) -> list[str]:
    """What is known not to be found, given the entity kinds that run (--pii-entities)."""
    out = [what for kind, what in _ENTITY_MISSING.items() if kind not in entities]
    for kind in entities:
        out += _ENTITY_GAPS.get(kind, [])
    return out + NOT_DETECTED


def _version(distribution: str) -> str:
    from importlib import metadata

    from appliance import __version__

    if not distribution:
        return f"appliance {__version__}"
    try:
        return f"{distribution} {metadata.version(distribution)}"
    except metadata.PackageNotFoundError:
        return f"{distribution} (not installed)"


# Entity recognizers, in the words of the report; places and organisations are not labelled in the set, so their
# figures are Explosion's, measured on OntoNotes 5 (the model's published metadata).
_ENTITY_METHODS = {
    "names": "spaCy's NER models' person spans (en_core_web_sm; fr_core_news_sm for French text) that hold a "
             "known given name or surname (Faker's names of 86 locales), names after titles (Mr, Dr, Frau, Mme, "
             "Sra.) or introductions and sign-offs in six languages, a known given name beside a known surname, and "
             "Chinese, Japanese and Korean names before an honorific (先生, さん, 씨)",
    "addresses": "a house number and a street ending in a street word (Street, Rd, Avenue), a street word and a "
                 "number (Calle Mayor 5, Via Roma 10, 12 rue de la Paix), compound street names (Hauptstraße 5, "
                 "Kerkstraat 12), with their flat, postcode and town",
    "locations": "spaCy's NER models' place spans (en_core_web_sm's GPE, LOC and FAC, published on OntoNotes 5: GPE "
                 "precision 0.91, recall 0.89; LOC 0.74, 0.61; FAC 0.39, 0.32; fr_core_news_sm's LOC)",
    "organisations": "spaCy's NER models' ORG spans (en_core_web_sm's published on OntoNotes 5: precision 0.79, "
                     "recall 0.82)",
}


def detectors(own: Sequence[Recognizer] = (), rules: str | None = None, entities: Sequence[str] = (),
              languages: Sequence[str] = ("en",), cache_dir: Path | None = None) -> list[PiiDetector]:
    """Every detector that runs, with its version and its precision and recall on the labelled set (an
    organisation's rules: on their own examples, which they pass by construction); the measurement is kept in
    `cache_dir` when one is given (`stored`)."""
    from appliance.entities import ENTITY_TYPES, model_version
    from appliance.national_ids import KINDS
    from appliance.records import PiiDetector, PiiMeasure

    measured = {kind: PiiMeasure(precision=p, recall=r, n=n)
                for kind, (p, r, n) in stored(cache_dir, LABELLED_REGION, tuple(entities), tuple(languages)).items()}
    out = [PiiDetector(types=list(types), method=method, version=_version(library),
                       measured={t: measured[t] for t in types}) for types, method, library in _METHODS]
    for kind in KINDS:
        how = kind.rule
        if kind.context:
            how += (f"; only after {', '.join(repr(w) for w in kind.context[:3])}"
                    + (f" or in {kind.region} data" if kind.region_is_enough else ""))
        out.append(PiiDetector(types=[kind.type], method=how, version=_version("python-stdnum"),
                               measured={kind.type: measured[kind.type]}))
    for entity in entities:
        version = _version("") if entity == "addresses" else model_version(languages) + (
            f"; {_version('Faker')} names" if entity == "names" else "")
        entity_type = ENTITY_TYPES[entity]
        out.append(PiiDetector(types=[entity_type], method=_ENTITY_METHODS[entity], version=version,
                               measured={entity_type: measured[entity_type]} if entity_type in measured else {}))
    for recognizer in own:  # proven on their own examples when the file loaded
        out.append(PiiDetector(types=[recognizer.type], method=f"rules file {rules}: {recognizer.rule}",
                               version=_version(""), measured={recognizer.type: PiiMeasure(
                                   precision=1.0, recall=1.0, n=recognizer.examples)}))
    return out
