"""PII detection measured on a labelled sample, consistent redaction, and no raw PII anywhere
the appliance writes besides the (redacted) data itself."""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Quickstarted
from data_helpers import run_prepare, split_rows, write_jsonl
from stdnum import iban as stdnum_iban

from appliance.pii import PII_TYPES, Redactor, find_pii
from appliance.run import Run
from appliance.store import Store

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
        return body + codicefiscale.calc_check_digit(body)

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
        return body + mod_11_10.calc_check_digit(body)

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
}


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
]


def _labelled_sample() -> tuple[list[str], list[tuple[int, str, str]]]:
    rng = random.Random(42)
    texts: list[str] = []
    truth: list[tuple[int, str, str]] = []
    for kind, values in {**_positives(rng), **_national_ids(rng)}.items():
        for value in values:
            text = rng.choice(NAMED[kind]).format(value) if kind in NAMED else value
            texts.append(rng.choice(CONTEXTS).format(text) + " " + rng.choice(NEGATIVES))
            truth.append((len(texts) - 1, kind, value))
    texts.extend(NEGATIVES)
    return texts, truth


def test_precision_and_recall_per_type() -> None:
    texts, truth = _labelled_sample()
    expected = {(i, kind): value for i, kind, value in truth}
    tp: dict[str, int] = dict.fromkeys(PII_TYPES, 0)
    fp = dict(tp)
    fn = dict(tp)
    for i, text in enumerate(texts):
        found = find_pii(text)
        for finding in found:
            value = expected.get((i, finding.type))
            if value is not None and (value in finding.value or finding.value in value):
                tp[finding.type] += 1
            else:
                fp[finding.type] += 1
        for (row, kind), value in expected.items():
            if row == i and not any(f.type == kind and (value in f.value or f.value in value) for f in found):
                fn[kind] += 1
    lines = ["type             precision  recall   (tp/fp/fn)"]
    for kind in PII_TYPES:
        precision = tp[kind] / max(1, tp[kind] + fp[kind])
        recall = tp[kind] / max(1, tp[kind] + fn[kind])
        lines.append(f"{kind:16} {precision:9.2f} {recall:7.2f}   ({tp[kind]}/{fp[kind]}/{fn[kind]})")
        assert precision >= 0.95, lines[-1]
        assert recall >= 0.95, lines[-1]
    print("\n" + "\n".join(lines))


def test_plain_digit_identifiers_need_their_name_or_their_region() -> None:
    """A valid NHS number, German tax ID or BSN is reported after the words that name it, or anywhere in data of
    its own country (--pii-region); elsewhere it is just a number. Distinctive ones are found anywhere."""
    def kinds(text: str, region: str = "US") -> list[str]:
        return [f.type for f in find_pii(text, region)]

    assert kinds("order 1102938475") == []
    assert kinds("NHS no. 110 293 8475") == ["UK_NHS"]
    assert kinds("order 1102938475", region="GB") == ["UK_NHS"]
    assert kinds("NHS no. 110 293 8476", region="GB") == []  # the check fails: not an NHS number
    assert kinds("batch 36574261809") == [] and kinds("batch 36574261809", region="DE") == ["DE_TAX_ID"]
    assert kinds("Steuer-ID 36574261809, Auftrag 36574261809") == ["DE_TAX_ID"]  # a number between: not named
    assert kinds("ref 111222333") == [] and kinds("ref 111222333", region="NL") == ["NL_BSN"]
    assert kinds("ITIN 912-70-1234") == ["US_ITIN"] and kinds("912-70-1234") == []
    assert kinds("codice fiscale RCCMNL83S18D969H") == kinds("RCCMNL83S18D969H") == ["IT_FISCAL_CODE"]
    redactor = Redactor()
    text = "NHS number 110 293 8475, again: NHS 1102938475"
    assert redactor.redact(text, find_pii(text)) == "NHS number <UK_NHS_1>, again: NHS <UK_NHS_1>"


def test_redaction_is_consistent_within_a_conversation() -> None:
    redactor = Redactor()
    first = "Mail ana@bank.de or ANA@bank.de, not bo@bank.de. Card 4111 1111 1111 1111."
    second = "Again: ana@bank.de and 4111-1111-1111-1111."
    out1 = redactor.redact(first, find_pii(first))
    out2 = redactor.redact(second, find_pii(second))
    assert out1 == "Mail <EMAIL_1> or <EMAIL_1>, not <EMAIL_2>. Card <CREDIT_CARD_1>."
    assert out2 == "Again: <EMAIL_1> and <CREDIT_CARD_1>."
    fresh = Redactor()  # another conversation starts over
    assert fresh.redact("bo@bank.de", find_pii("bo@bank.de")) == "<EMAIL_1>"


def test_redact_mode_keeps_placeholders_per_conversation(tmp_path: Path, default_store: Store) -> None:
    rows = [{"messages": [{"role": "user", "content": "I am ana@bank.de, call +1 212 555 0142"},
                          {"role": "assistant", "content": "Thanks, we will email ana@bank.de."}]}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path], split=(1.0, 0.0, 0.0))
    messages = split_rows(tmp_path / "run")["train"][0]["messages"]
    assert messages[0]["content"] == "I am <EMAIL_1>, call <PHONE_1>"
    assert messages[1]["content"] == "Thanks, we will email <EMAIL_1>."
    assert report["pii"]["counts"] == {"EMAIL": 2, "PHONE": 1}
    preview = report["pii"]["previews"]  # what the data screen shows: before (masked) and after
    assert preview == [{"source": f"{path}:1", "role": "user", "types": ["EMAIL", "PHONE"],
                        "before": "I am a**@****.**, call +* *** *** ****", "after": "I am <EMAIL_1>, call <PHONE_1>"}]


def test_placeholders_can_be_numbered_across_the_whole_dataset(tmp_path: Path, default_store: Store) -> None:
    rows = [{"prompt": "I am ana@bank.de", "completion": "Ok."}, {"prompt": "bo@bank.de here", "completion": "Ok."},
            {"prompt": "ana@bank.de again, with bo@bank.de", "completion": "Ok."}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    prompts = {}
    for scope in ("conversation", "dataset"):
        run_prepare(tmp_path / scope, default_store.root, [path], split=(1.0, 0.0, 0.0), pii_scope=scope)
        prompts[scope] = sorted(r["messages"][0]["content"] for r in split_rows(tmp_path / scope)["train"])
    assert prompts["conversation"] == ["<EMAIL_1> again, with <EMAIL_2>", "<EMAIL_1> here", "I am <EMAIL_1>"]
    assert prompts["dataset"] == ["<EMAIL_1> again, with <EMAIL_2>", "<EMAIL_2> here", "I am <EMAIL_1>"]


def test_drop_and_report_modes(tmp_path: Path, default_store: Store) -> None:
    rows = [{"prompt": "My SSN is 123-45-6789", "completion": "Noted."}, {"prompt": "Hello", "completion": "Hi."}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    report, _ = run_prepare(tmp_path / "drop", default_store.root, [path], pii="drop", split=(1.0, 0.0, 0.0))
    assert report["counts"]["pii_dropped"] == 1 and report["counts"]["train"] == 1
    assert report["pii"]["dropped"][0]["types"] == ["SSN"]
    assert report["pii"]["previews"][0]["after"] == "(the row is dropped)"
    report, _ = run_prepare(tmp_path / "rep", default_store.root, [path], pii="report", split=(1.0, 0.0, 0.0))
    assert report["pii"]["counts"] == {"SSN": 1}
    assert "123-45-6789" in (tmp_path / "rep" / "data" / "train.jsonl").read_text()  # report only: kept
    assert report["pii"]["previews"][0]["before"] == report["pii"]["previews"][0]["after"] == "My SSN is 1**-**-****"
    assert "123-45-6789" not in Run.at(tmp_path / "rep").data_report_path.read_text()


RULES = """\
EMPLOYEE_ID:
  pattern: 'EMP-\\d{6}\\b'
  context: [employee, staff]
  match: ["employee EMP-004211", "staff no. EMP-000017"]
  no_match: ["EMP-004211 alone", "employee EMP-12"]
CODENAME:
  words: [Bluebird, Nightjar]
  match: ["the BLUEBIRD rollout"]
  no_match: ["a blue bird", "Bluebirds"]
"""


def test_own_recognizers_redact_an_organisations_identifiers(tmp_path: Path, default_store: Store) -> None:
    """A rules file's identifiers are found, redacted with their own placeholders, counted, and the rules the run
    used are kept in its data folder (covered by the signed manifest)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES, encoding="utf-8")
    rows = [{"prompt": "Employee EMP-004211 asked about Nightjar; employee EMP-004211 again", "completion": "Ok."},
            {"prompt": "Ticket EMP-004211 without its word", "completion": "Ok."}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path], split=(1.0, 0.0, 0.0),
                            pii_recognizers=str(rules))
    prompts = sorted(row["messages"][0]["content"] for row in split_rows(tmp_path / "run")["train"])
    assert prompts == ["Employee <EMPLOYEE_ID_1> asked about <CODENAME_1>; employee <EMPLOYEE_ID_1> again",
                       "Ticket EMP-004211 without its word"]  # no naming word before it: not this identifier
    assert report["pii"]["counts"] == {"CODENAME": 1, "EMPLOYEE_ID": 2}
    assert (tmp_path / "run" / "data" / "pii_recognizers.yaml").read_text(encoding="utf-8") == RULES


@pytest.mark.parametrize(("change", "says"), [
    (("\\d{6}\\b", "(\\d{6}"), "rules.yaml:1: EMPLOYEE_ID: the pattern is not a valid regular expression"),
    (("  context: [employee, staff]\n", ""), "rules.yaml:1: EMPLOYEE_ID: finds 'EMP-004211' in its "
                                           "counter-example 'EMP-004211 alone'"),
    (("context: [employee, staff]", "context: [employee]"), "EMPLOYEE_ID: does not find its own example "
                                                            "'staff no. EMP-000017'"),
    (("CODENAME:", "EMAIL:"), "rules.yaml:6: EMAIL: is a built-in type"),
    (("  words: [Bluebird, Nightjar]", "  words: [Bluebird]\n  pattern: x"), "CODENAME: give either pattern or words"),
    (("  no_match: [\"a blue bird\", \"Bluebirds\"]", "  colour: blue"), "CODENAME: unknown key 'colour'"),
    (("CODENAME:", "codename:"), "rules.yaml:6: codename: a type is 2 to 32 capitals"),
])
def test_a_rule_that_fails_its_own_examples_is_refused_by_name(tmp_path: Path, default_store: Store,
                                                               change: tuple[str, str], says: str) -> None:
    from appliance.errors import ConfigError
    from appliance.pii import PII_TYPES
    from appliance.recognizers import load

    rules = tmp_path / "rules.yaml"
    assert change[0] in RULES
    rules.write_text(RULES.replace(change[0], change[1]), encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load(rules, PII_TYPES)
    assert says in refused.value.message, refused.value.message
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello", "completion": "Hi."}])
    with pytest.raises(ConfigError):  # the data stage refuses it before reading any data
        run_prepare(tmp_path / "run", default_store.root, [path], pii_recognizers=str(rules))
    assert not (tmp_path / "run" / "data").exists()


@pytest.mark.slow
def test_no_raw_pii_in_reports_events_or_logs(quickstarted: Quickstarted) -> None:
    """The whole product on the shipped sample (the quickstart: data, training, export, evaluation): planted
    PII appears in none of what it wrote or printed, but was counted."""
    from appliance.data.sample import generate

    planted = set()
    for row in generate():
        for finding in find_pii(row["text"]):
            planted.add(finding.value)
    assert len(planted) > 50
    assert sum(quickstarted.summary["data"]["pii"].values()) >= len(planted)
    written = [quickstarted.stdout, quickstarted.stderr]
    texts = (".jsonl", ".json", ".yaml", ".log", ".md", ".jinja", ".sh", "Modelfile")
    written += [p.read_text(encoding="utf-8") for p in quickstarted.run_dir.rglob("*")
                if p.is_file() and p.name.endswith(texts)]
    assert len(written) > 20  # splits, reports, events, logs, evaluations, the manifest, the export's files
    leaks = [value for value in planted if any(value in text for text in written)]
    assert leaks == []
