"""Benchmark: PII detection, per type precision and recall on the labelled set, against named peers.

    .venv/bin/python bench/pii.py

The labelled set is the appliance's own (appliance/pii_eval.py): valid values of every type written
the ways people write them, names of many cultures and scripts, addresses of twelve countries, next to
look-alikes (wrong check digits, numbers with a purpose, products, companies named after people or
streets, eponyms). A finding is right when it overlaps a labelled value of its type; a name or an
address counts as found only when every letter and digit of it is covered.

- appliance: find_pii with names and addresses (the data stage's default).
- spaCy alone: en_core_web_sm 3.8.0 (the model the appliance uses), its PERSON spans as names and
  its GPE/LOC/FAC spans as addresses; the rest it does not look for.
- Presidio: Microsoft's presidio-analyzer with its default recognizers over the same spaCy model
  (its LOCATION as addresses, DATE_TIME as dates of birth), when installed in this interpreter:
  `.venv/bin/pip install presidio-analyzer==2.2.366` (not a dependency of the appliance).

Texts per second: the whole labelled set, after one warm-up pass.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance import offline  # noqa: E402

Found = list[tuple[str, int, int, str]]

PRESIDIO_TYPES = {"EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "CREDIT_CARD": "CREDIT_CARD", "IBAN_CODE": "IBAN",
                  "US_SSN": "SSN", "IP_ADDRESS": "IP_ADDRESS", "UK_NHS": "UK_NHS", "UK_NINO": "UK_NINO",
                  "US_ITIN": "US_ITIN", "ES_NIF": "ES_DNI", "ES_NIE": "ES_NIE", "IT_FISCAL_CODE": "IT_FISCAL_CODE",
                  "PERSON": "PERSON", "LOCATION": "ADDRESS", "DATE_TIME": "DATE_OF_BIRTH"}


def appliance_finder() -> Callable[[Sequence[str]], list[Found]]:
    from appliance.entities import DEFAULT_ENTITIES, EntityFinder
    from appliance.pii import find_pii

    def run(texts: Sequence[str]) -> list[Found]:
        finder = EntityFinder(DEFAULT_ENTITIES)  # a fresh one: it remembers the texts it has read
        named = finder.find_conversations([[t] for t in texts])
        return [[(f.type, f.start, f.end, f.value) for f in find_pii(t, "US", (), n[0])]
                for t, n in zip(texts, named, strict=True)]

    return run


def spacy_finder() -> Callable[[Sequence[str]], list[Found]]:
    from appliance.entities import _pipeline

    nlp = _pipeline()
    kinds = {"PERSON": "PERSON", "GPE": "ADDRESS", "LOC": "ADDRESS", "FAC": "ADDRESS"}

    def run(texts: Sequence[str]) -> list[Found]:
        return [[(kinds[e.label_], e.start_char, e.end_char, e.text) for e in doc.ents if e.label_ in kinds]
                for doc in nlp.pipe(list(texts), batch_size=64)]  # type: ignore[attr-defined]

    return run


def presidio_finder() -> Callable[[Sequence[str]], list[Found]] | None:
    try:
        from presidio_analyzer import AnalyzerEngine  # type: ignore[import-not-found]
        from presidio_analyzer.nlp_engine import NlpEngineProvider  # type: ignore[import-not-found]
    except ImportError:
        return None
    import tldextract  # type: ignore[import-not-found]

    from appliance.entities import MODELS

    # Presidio checks e-mail domains with tldextract, which downloads the public suffix list; offline, its copy
    offline_suffixes = tldextract.TLDExtract(suffix_list_urls=())
    tldextract.extract = offline_suffixes

    models = [{"lang_code": "en", "model_name": MODELS["en"].package}]
    provider = NlpEngineProvider(nlp_configuration={"nlp_engine_name": "spacy", "models": models})
    analyzer = AnalyzerEngine(nlp_engine=provider.create_engine(), supported_languages=["en"])

    def run(texts: Sequence[str]) -> list[Found]:
        out = []
        for text in texts:
            results = analyzer.analyze(text=text, language="en")
            out.append([(PRESIDIO_TYPES[r.entity_type], r.start, r.end, text[r.start:r.end]) for r in results
                        if r.entity_type in PRESIDIO_TYPES])
        return out

    return run


def main() -> None:
    offline.activate()
    from appliance import pii_eval
    from appliance.pii import PII_TYPES

    texts, truth = pii_eval.labelled_sample()
    types = [t for t in PII_TYPES if any(kind == t for _, kind, _ in truth)]
    peers: list[tuple[str, Callable[[Sequence[str]], list[Found]] | None]] = [
        ("appliance", appliance_finder()), ("spaCy alone", spacy_finder()), ("Presidio", presidio_finder())]
    scores: dict[str, dict[str, tuple[float, float, int]]] = {}
    speed: dict[str, float] = {}
    for name, finder in peers:
        if finder is None:
            print(f"... {name}: not installed (pip install presidio-analyzer==2.2.366)", file=sys.stderr)
            continue
        finder(texts)  # warm-up
        started = time.perf_counter()
        found = finder(texts)
        speed[name] = len(texts) / (time.perf_counter() - started)
        scores[name] = pii_eval.score(texts, truth, found, types)
        print(f"... {name}: {speed[name]:.0f} texts/s", file=sys.stderr)
    names = list(scores)
    print(f"labelled set: {len(truth)} values in {len(texts)} texts (precision / recall)\n")
    print(f"{'type':<16} {'n':>4}  " + "  ".join(f"{n:>13}" for n in names))
    for kind in types:
        cells = []
        for name in names:
            p, r, _ = scores[name].get(kind, (0.0, 0.0, 0))
            looked = name == "appliance" or (name == "spaCy alone" and kind in ("PERSON", "ADDRESS")) or (
                name == "Presidio" and kind in PRESIDIO_TYPES.values())
            cells.append(f"{p:>6.2f} / {r:<4.2f}" if looked else f"{'—':>13}")
        n = sum(1 for _, k, _ in truth if k == kind)
        print(f"{kind:<16} {n:>4}  " + "  ".join(cells))
    print(f"{'texts/s':<16} {'':>4}  " + "  ".join(f"{speed[n]:>13.0f}" for n in names))


if __name__ == "__main__":
    main()
