"""PII detection measured on a labelled sample, consistent redaction, and no raw PII anywhere
the appliance writes besides the (redacted) data itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Quickstarted
from data_helpers import run_prepare, split_rows, write_jsonl

from appliance import pii_eval
from appliance.entities import DEFAULT_ENTITIES, EntityFinder, EntityModelError, check_model, model_dir
from appliance.pii import PII_TYPES, Redactor, find_pii
from appliance.run import Run
from appliance.store import Store


def test_precision_and_recall_per_type() -> None:
    lines = ["type             precision  recall   (n)"]
    for kind, (precision, recall, n) in pii_eval.measure().items():
        lines.append(f"{kind:16} {precision:9.2f} {recall:7.2f}   ({n})")
        assert n >= 5 and precision >= 0.95 and recall >= 0.95, lines[-1]
    print("\n" + "\n".join(lines))


def test_names_addresses_places_and_organisations_beside_their_look_alikes() -> None:
    """Names from several cultures, with a title, an introduction or on their own; addresses of six countries; and
    what looks like them but is not: products, companies named after people or streets, eponyms, numbered things
    in front of a street word, streets without a house."""
    finder = EntityFinder(["names", "addresses", "locations", "organisations"])

    def found(text: str) -> list[tuple[str, str]]:
        return [(e.type, e.value) for e in finder.find(text)]

    assert found("Hi, I'm Ana, thanks!") == [("PERSON", "Ana")]
    assert found("Please call Priya Natarajan or Dr. Oluwaseun Adeyemi.") == [
        ("PERSON", "Priya Natarajan"), ("PERSON", "Oluwaseun Adeyemi")]
    assert found("Hola, soy María García López, vivo en Calle Mayor 5, 28013 Madrid.") == [
        ("PERSON", "María García López"), ("ADDRESS", "Calle Mayor 5, 28013 Madrid")]
    assert found("Het adres van mevr. de Vries is Kerkstraat 12, 1017 GC Amsterdam.") == [
        ("PERSON", "de Vries"), ("ADDRESS", "Kerkstraat 12, 1017 GC Amsterdam")]
    assert found("Иван Петров and 王伟先生 signed.") == [("PERSON", "Иван Петров"), ("PERSON", "王伟")]
    assert found("Send it to 221B Baker St, London NW1 6XE.") == [("ADDRESS", "221B Baker St, London NW1 6XE")]
    assert found("Mail 1600 Pennsylvania Avenue NW, Washington, DC 20500 today") == [
        ("ADDRESS", "1600 Pennsylvania Avenue NW, Washington, DC 20500")]
    assert found("Wohnhaft Hauptstraße 5, 10115 Berlin; Via Roma 10, 00184 Roma; 12 rue de la Paix, 75002 Paris") == [
        ("ADDRESS", "Hauptstraße 5, 10115 Berlin"), ("ADDRESS", "Via Roma 10, 00184 Roma"),
        ("ADDRESS", "12 rue de la Paix, 75002 Paris")]
    for text in ("Our Adobe Acrobat renewal failed.", "Jira crashes when Zoom runs.", "Victoria Station was shut.",
                 "The Parkinson's disease clinic moved.", "Ticket 4412 Park Avenue project is on hold.",
                 "May I ask? Will the patch land in June? Mark it resolved.", "version 2.4.1 crashes"):
        assert [t for t, _ in found(text)] in ([], ["ORGANISATION"], ["LOCATION"]), (text, found(text))
    for text in ("Send it via Teams 2 times.", "The launch will take place Monday 5 June.", "During 2023 we grew.",
                 "Hi Power BI users, the dashboards moved.", "Thanks, Tableau Server admins.", "Bring 2 chairs."):
        assert [t for t, _ in found(text)] in ([], ["ORGANISATION"], ["LOCATION"]), (text, found(text))
    assert found("Regards, Senior Project Manager Maria Lopez") == [("PERSON", "Maria Lopez")]  # not her title
    assert [v for t, v in found("Status    Update    Tom Becker") if t == "PERSON"] == ["Tom Becker"]
    assert found("请联系王伟先生") == [("PERSON", "王伟")] and found("김민준씨에게") == [("PERSON", "김민준")]
    assert found("Morgan Stanley and Wells Fargo reported; Acme Corp too.") == [
        ("ORGANISATION", "Morgan Stanley"), ("ORGANISATION", "Wells Fargo"), ("ORGANISATION", "Acme Corp")]
    assert ("LOCATION", "Paris") in found("Jean-Pierre Dubois moved to Paris.")
    only_addresses = EntityFinder(["addresses"])  # without the model: nothing else
    assert [e.type for e in only_addresses.find("Sara Rossi, 12 Baker Street, Leeds")] == ["ADDRESS"]
    text = "Thanks, Sara Rossi. SARA ROSSI again, at 12 Baker Street."  # one person, one placeholder
    assert Redactor().redact(text, find_pii(text, entities=finder)) == "Thanks, <PERSON_1>. <PERSON_1> again, at " \
                                                                       "<ADDRESS_1>."


def test_french_text_is_read_by_the_french_model_when_the_run_says_so() -> None:
    """With en and fr, each text goes to the model of its language; French names, French look-alikes."""
    from appliance.entities import guess_language

    assert guess_language("Bonjour, je suis Camille Martin", ["en", "fr"]) == "fr"
    assert guess_language("Please call Camille Martin", ["en", "fr"]) == "en"
    finder = EntityFinder(["names", "organisations"], languages=["en", "fr"])
    assert [(e.type, e.value) for e in finder.find("Le patient Mamadou Diop est sorti vendredi.")] == [
        ("PERSON", "Mamadou Diop")]
    assert [(e.type, e.value) for e in finder.find("La Renault Clio du Crédit Agricole est au garage.")] == [
        ("ORGANISATION", "Crédit Agricole")]
    for text in ("Le lycée Jean Moulin ouvre lundi.", "Le syndrome de Gilles de la Tourette est suivi ici.",
                 "La rue Victor Hugo est fermée."):
        assert [e.type for e in finder.find(text)] == [], text
    p, r, n = pii_eval.measure("US", ("names", "addresses"), ("en", "fr"))["PERSON"]
    assert n == 76 and p >= 0.95 and r >= 0.95, (p, r, n)


def test_a_text_longer_than_the_model_takes_is_read_in_pieces() -> None:
    """spaCy refuses a text of a million characters; a long one is read in pieces, offsets intact."""
    from appliance import entities

    text = "Status report. " * 8000 + "Thanks, Kateryna Shevchenko, 12 Baker Street, Leeds."
    assert len(text) > entities.MODEL_CHARS
    found = [(e.type, text[e.start:e.end]) for e in EntityFinder(["names", "addresses"]).find(text)]
    assert found == [("PERSON", "Kateryna Shevchenko"), ("ADDRESS", "12 Baker Street, Leeds")]
    assert [len(p) for _, p in entities._pieces("word " * 50_000)] == [100_000, 100_000, 50_000]


def test_texts_repeated_across_batches_are_read_once_and_remembered_within_bounds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A system prompt repeats in every row: it is read once, remembered while it keeps coming, and the memory of
    texts stays bounded (the least recently used is forgotten, never one the batch in hand still needs)."""
    from appliance import entities

    monkeypatch.setattr(entities, "SEEN_TEXTS", 3)
    finder = EntityFinder(["names"], model=False)
    prompt = "Classify the text. Answer with the label only."
    for i in range(6):
        rows = [[prompt, f"Thanks, Sara Rossi, ticket {i}-{j}"] for j in range(2)]
        found = finder.find_conversations(rows)
        assert [[e.value for e in message] for row in found for message in row] == [[], ["Sara Rossi"]] * 2
        assert prompt in finder._seen and len(finder._seen) <= 3


def test_the_entity_model_is_explosions_published_one_or_it_is_refused(tmp_path: Path) -> None:
    """The model comes from a re-upload on PyPI: before it loads, its metadata must be Explosion's published
    en_core_web_sm 3.8.0 (training commit, accuracy figures) and its files the ones measured here."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model_dir(), copy)
    check_model(copy)
    meta = (copy / "meta.json").read_text(encoding="utf-8")
    (copy / "meta.json").write_text(meta.replace('"ents_f":0.8433119744', '"ents_f":0.9'), encoding="utf-8")
    if meta == (copy / "meta.json").read_text(encoding="utf-8"):  # written with spaces
        (copy / "meta.json").write_text(meta.replace('"ents_f": 0.8433119744', '"ents_f": 0.9'), encoding="utf-8")
    with pytest.raises(EntityModelError, match=r"not Explosion's en_core_web_sm 3\.8\.0"):
        check_model(copy)
    (copy / "meta.json").write_text(meta, encoding="utf-8")
    weights = copy / "ner" / "model"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(EntityModelError, match=r"files at .* changed"):
        check_model(copy)


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


def test_a_date_is_a_date_of_birth_only_when_the_text_says_so() -> None:
    def found(text: str) -> list[str]:
        return [f.value for f in find_pii(text) if f.type == "DATE_OF_BIRTH"]

    assert found("Patient born on 3 March 1961, admitted 2024-11-28") == ["3 March 1961"]
    assert found("DOB: 1961-03-03; invoice 2024-11-28") == ["1961-03-03"]
    assert found("geboren am 3. März 1961") == ["3. März 1961"] and found("née le 1er mai 1961") == ["1er mai 1961"]
    assert found("fecha de nacimiento: 3 de marzo de 1961") == ["3 de marzo de 1961"]
    assert found("date of birth 02/30/1961") == []  # no such day
    assert found("date of birth 3/4/2999") == []  # not born yet
    assert found("the meeting on 3 March 1961") == found("born in 1961") == []
    assert found("born 3/4/61") == ["3/4/61"]


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


def test_names_and_addresses_are_redacted_unless_the_run_turns_them_off(tmp_path: Path, default_store: Store) -> None:
    asked = "Hi, I'm Sara Rossi; send it to 18 Harbour Lane, Bristol BS1 4DJ"
    rows = [{"messages": [{"role": "user", "content": asked},
                          {"role": "assistant", "content": "Thanks Sara Rossi, it ships to 18 Harbour Lane today."}]}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    report, _ = run_prepare(tmp_path / "on", default_store.root, [path], split=(1.0, 0.0, 0.0))
    messages = split_rows(tmp_path / "on")["train"][0]["messages"]
    assert messages[0]["content"] == "Hi, I'm <PERSON_1>; send it to <ADDRESS_1>"
    assert messages[1]["content"] == "Thanks <PERSON_1>, it ships to <ADDRESS_2> today."  # no town: another value
    assert report["pii"]["counts"] == {"ADDRESS": 2, "PERSON": 2}
    assert report["pii"]["previews"][0]["before"] == "Hi, I'm S*** *****; send it to 1* ******* ****, ******* *** ***"
    report, _ = run_prepare(tmp_path / "off", default_store.root, [path], split=(1.0, 0.0, 0.0), pii_entities=[])
    assert report["pii"]["counts"] == {} and "Sara Rossi" in (tmp_path / "off" / "data" / "train.jsonl").read_text()
    assert "people's names" in report["pii"]["not_detected"]


def test_a_row_that_redaction_makes_too_long_is_a_problem_not_a_crash(tmp_path: Path, default_store: Store) -> None:
    """<PERSON_1> can take more tokens than the name: a row just under --max-seq-len may go over it once redacted.
    It is listed as a problem of its own file and line, and the other rows are prepared."""
    from appliance.templating import encode, load_tokenizer

    row = {"prompt": "Thanks, Li Wei.", "completion": "Ok."}
    tokenizer = load_tokenizer(default_store.model_dir(default_store.resolve_model(None, "", "")))
    length = len(encode(tokenizer, [{"role": "user", "content": row["prompt"]},
                                    {"role": "assistant", "content": row["completion"]}])[0])
    path = write_jsonl(tmp_path / "p.jsonl", [row, {"prompt": "Hello", "completion": "Hi."}])
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path], templating=True, max_seq_len=length,
                            on_error="skip", split=(1.0, 0.0, 0.0))
    assert report["counts"]["train"] == 1 and report["counts"]["invalid"] == 1
    problem = report["problems"][0]
    assert (problem["line"], problem["field"]) == (1, "messages") and "after PII redaction" in problem["reason"]


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
    own = {d["types"][0]: d for d in report["pii"]["detectors"] if d["method"].startswith("rules file")}
    assert own["EMPLOYEE_ID"]["method"] == f"rules file {rules}: pattern EMP-\\d{{6}}\\b, after employee, staff"
    assert own["EMPLOYEE_ID"]["measured"]["EMPLOYEE_ID"]["n"] == 4


def test_the_report_says_what_ran_how_well_and_what_it_does_not_find(tmp_path: Path, default_store: Store) -> None:
    """The data report's PII section is one a data-protection officer can sign: every type with its count and what
    was done, every detector with its library version and its precision and recall measured on the labelled set
    in this very run, and what is known not to be detected."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "NHS number 110 293 8475", "completion": "Ok."}])
    report, _ = run_prepare(tmp_path / "run", default_store.root, [path], split=(1.0, 0.0, 0.0), pii_region="GB")
    pii = report["pii"]
    assert (pii["mode"], pii["scope"], pii["region"], pii["counts"]) == ("redact", "conversation", "GB", {"UK_NHS": 1})
    by_type = {t: d for d in pii["detectors"] for t in d["types"]}
    assert set(by_type) == set(PII_TYPES) - {"LOCATION", "ORGANISATION"}  # places and organisations: when asked
    assert by_type["PERSON"]["version"].startswith("spaCy 3.8.18, en_core_web_sm 3.8.0") and \
        "Faker 40." in by_type["PERSON"]["version"]
    assert by_type["UK_NHS"]["version"].startswith("python-stdnum 2.")
    assert by_type["PHONE"]["version"].startswith("phonenumbers ")
    assert "mod-11" in by_type["UK_NHS"]["method"] and "or in GB data" in by_type["UK_NHS"]["method"]
    for kind, d in by_type.items():
        measured = d["measured"][kind]
        assert measured["precision"] >= 0.95 and measured["recall"] >= 0.95 and measured["n"] >= 5, (kind, measured)
    assert "people's names" not in pii["not_detected"] and "organisations' names" in pii["not_detected"]
    assert any("scripts without capital letters" in gap for gap in pii["not_detected"])
    assert "labelled set" in pii["measured_on"] and "region US" in pii["measured_on"]


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
    from appliance.data.sample import ADDRESSES, NAMES, generate

    planted = set()
    finder = EntityFinder(DEFAULT_ENTITIES)
    for row in generate():
        for finding in find_pii(row["text"], entities=finder):
            planted.add(finding.value)
    assert set(NAMES) | set(ADDRESSES) <= planted and len(planted) > 60  # names and addresses too
    assert sum(quickstarted.summary["data"]["pii"].values()) >= len(planted)
    written = [quickstarted.stdout, quickstarted.stderr]
    texts = (".jsonl", ".json", ".yaml", ".log", ".md", ".jinja", ".sh", "Modelfile")
    written += [p.read_text(encoding="utf-8") for p in quickstarted.run_dir.rglob("*")
                if p.is_file() and p.name.endswith(texts)]
    assert len(written) > 20  # splits, reports, events, logs, evaluations, the manifest, the export's files
    leaks = [value for value in planted if any(value in text for text in written)]
    assert leaks == []


def test_a_store_keeps_the_measurement_under_a_key_of_what_it_depends_on(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The labelled-set measurement a data job puts in its report is kept in the store's cache for the next job,
    read back only while its key (settings, detectors' source, libraries, models) is the same."""
    first = pii_eval.stored(tmp_path, "US", (), ("en",))
    kept = list(tmp_path.glob("pii-measure-*.json"))
    assert len(kept) == 1 and first == pii_eval.measure("US", (), ("en",))
    record = json.loads(kept[0].read_text(encoding="utf-8"))
    record["measured"]["EMAIL"] = [0.5, 0.5, 3]  # planted: what is read back is what was kept, not measured again
    kept[0].write_text(json.dumps(record), encoding="utf-8")
    assert pii_eval.stored(tmp_path, "US", (), ("en",))["EMAIL"] == (0.5, 0.5, 3)
    record["key"] = "0" * 64  # kept for something else under the same name: measured again
    kept[0].write_text(json.dumps(record), encoding="utf-8")
    assert pii_eval.stored(tmp_path, "US", (), ("en",)) == first
    kept[0].write_text("{", encoding="utf-8")  # cut short: measured again, and kept whole again
    assert pii_eval.stored(tmp_path, "US", (), ("en",)) == first
    assert json.loads(kept[0].read_text(encoding="utf-8"))["key"] == pii_eval.measurement_key("US", (), ("en",))
    key = pii_eval.measurement_key("US", (), ("en",))
    assert key != pii_eval.measurement_key("US", (), ("en", "fr")) != pii_eval.measurement_key("GB", (), ("en",))
    monkeypatch.setattr(pii_eval, "MEASURED_CODE", pii_eval.MEASURED_CODE[1:])  # as if a detector's code changed
    assert pii_eval.measurement_key("US", (), ("en",)) != key
    monkeypatch.setattr(pii_eval, "MEASURED_LIBRARIES", (*pii_eval.MEASURED_LIBRARIES, "no-such-library"))
    assert pii_eval.measurement_key("US", (), ("en",)) != key
