"""The evaluation metrics: hand-computed values on small inputs, agreement with scikit-learn on random
ones, and the behaviour of the bootstrap intervals and paired comparisons built on them."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from appliance.evaluate import metrics
from appliance.evaluate.metrics import (
    OTHER,
    ClassificationReport,
    Comparison,
    Interval,
    bootstrap_ci,
    bootstrap_metric,
    classification_report,
    compare,
    compare_metric,
    describe,
    exact_match,
    extraction_report,
    f1_metric,
    normalize_answer,
    parse_json_object,
    perplexity,
    qa_report,
    same_value,
    token_f1,
)

FAST = 50  # resamples where only the point estimates matter

# ------------------------------------------------------------------------------------ classification


def test_classification_by_hand() -> None:
    labels = ["pos", "neg", "neu"]
    refs = ["pos", "pos", "pos", "neg", "neg", "neu"]
    preds = ["pos", "neg", None, "neg", "pos", "maybe"]
    report = classification_report(refs, preds, labels, resamples=FAST)
    # correct: items 0 and 3 -> 2/6
    assert report.accuracy.point == pytest.approx(1 / 3)
    # pos: tp 1, predicted 2 (items 0, 4), support 3 -> P 1/2, R 1/3, F1 2*1/(2+3) = 0.4
    # neg: tp 1, predicted 2 (items 1, 3), support 2 -> P 1/2, R 1/2, F1 2*1/(2+2) = 0.5
    # neu: never predicted, support 1 -> P 0 (zero division), R 0, F1 0
    expected = {"pos": (0.5, 1 / 3, 0.4, 3), "neg": (0.5, 0.5, 0.5, 2), "neu": (0.0, 0.0, 0.0, 1)}
    for label, (p, r, f, s) in expected.items():
        scores = report.per_label[label]
        assert (scores.precision, scores.recall, scores.f1, scores.support) == pytest.approx((p, r, f, s))
    assert report.macro_precision.point == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert report.macro_recall.point == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)  # 5/18
    assert report.macro_f1.point == pytest.approx((0.4 + 0.5 + 0) / 3)  # 0.3
    assert report.weighted_precision.point == pytest.approx((0.5 * 3 + 0.5 * 2 + 0 * 1) / 6)  # 5/12
    assert report.weighted_recall.point == pytest.approx(1 / 3)  # weighted recall is accuracy
    assert report.weighted_f1.point == pytest.approx((0.4 * 3 + 0.5 * 2 + 0 * 1) / 6)  # 11/30
    assert report.confusion_columns == ["pos", "neg", "neu", OTHER]
    assert report.confusion == [[1, 1, 0, 1],  # pos read as pos, neg, and None
                                [1, 1, 0, 0],  # neg read as pos, neg
                                [0, 0, 0, 1]]  # neu read as "maybe"
    assert report.out_of_set_rate == pytest.approx(2 / 6)  # None and "maybe"
    assert report.correct == [True, False, False, True, False, False]


def test_label_only_predicted_counts_in_macro_average() -> None:
    report = classification_report(["a", "a", "b"], ["a", "c", "b"], ["a", "b", "c"], resamples=FAST)
    # a: P 1/1, R 1/2, F1 2/3; b: P 1, R 1, F1 1; c: never a reference, predicted once: P 0, R 0, F1 0
    assert report.per_label["c"].support == 0
    assert report.macro_f1.point == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert report.weighted_f1.point == pytest.approx((2 / 3 * 2 + 1 * 1) / 3)  # c has no weight


@pytest.mark.parametrize("seed", range(6))
def test_classification_agrees_with_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = ["billing", "outage", "sales", "spam", "hr"]
    n = int(rng.integers(20, 300))
    refs = [str(x) for x in rng.choice(labels[:-1], n)]  # "hr" never a reference
    noise: list[str | None] = [*labels[1:], "", None, "Billing", "no idea"]
    preds = [r if r != "billing" and rng.random() < 0.5 else noise[int(rng.integers(len(noise)))] for r in refs]
    refs += ["sales", "sales", "outage", "spam"]  # whatever the draw: each kind of answer at least once
    preds += ["hr", None, "", "no idea"]
    n += 4
    assert "billing" in refs and "billing" not in preds and "hr" not in refs  # a label never predicted, one never true
    mapped = [p if p in labels else OTHER for p in preds]
    report = classification_report(refs, preds, labels, resamples=FAST)

    assert report.accuracy.point == pytest.approx(accuracy_score(refs, mapped), rel=1e-12)
    p, r, f, s = precision_recall_fscore_support(refs, mapped, labels=labels, zero_division=0)
    assert [report.per_label[x].precision for x in labels] == pytest.approx(p, rel=1e-12)
    assert [report.per_label[x].recall for x in labels] == pytest.approx(r, rel=1e-12)
    assert [report.per_label[x].f1 for x in labels] == pytest.approx(f, rel=1e-12)
    assert [report.per_label[x].support for x in labels] == list(s)
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(refs, mapped, labels=labels, average=average, zero_division=0)
        assert getattr(report, f"{average}_precision").point == pytest.approx(p, rel=1e-12)
        assert getattr(report, f"{average}_recall").point == pytest.approx(r, rel=1e-12)
        assert getattr(report, f"{average}_f1").point == pytest.approx(
            f1_score(refs, mapped, labels=labels, average=average, zero_division=0), rel=1e-12)
        assert f1_metric(refs, preds, labels, average)(np.arange(n)) == pytest.approx(f, rel=1e-12)
    expected = confusion_matrix(refs, mapped, labels=[*labels, OTHER])
    assert not expected[-1].any() and report.confusion == expected[:-1].tolist()  # no reference is OTHER
    assert report.out_of_set_rate == pytest.approx(sum(p not in labels for p in preds) / n)


def test_classification_rejects_bad_input_with_every_problem() -> None:
    with pytest.raises(ValueError, match=r"labels repeat: a.*outside the label set: 'z'.*2 references but 1"):
        classification_report(["a", "z"], ["a"], ["a", "a", "b"])
    with pytest.raises(ValueError, match="no items"):
        classification_report([], [], ["a"])


def test_report_serialises_to_json_and_back() -> None:
    report = classification_report(["a", "b"], ["a", None], ["a", "b"], resamples=FAST)
    again = ClassificationReport.model_validate_json(report.model_dump_json())
    assert again == report
    assert json.loads(report.model_dump_json())["accuracy"]["point"] == 0.5


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(["a", "b", "c", "d", "", None])),
                min_size=1, max_size=40))
def test_classification_figures_are_bounded(pairs: list[tuple[str, str | None]]) -> None:
    refs, preds = [r for r, _ in pairs], [p for _, p in pairs]
    report = classification_report(refs, preds, ["a", "b", "c"], resamples=20)
    for name in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_f1"):
        figure: Interval = getattr(report, name)
        assert 0 <= figure.low <= figure.high <= 1 and 0 <= figure.point <= 1
    assert 0 <= report.out_of_set_rate <= 1
    assert sum(map(sum, report.confusion)) == len(pairs)


# ---------------------------------------------------------------------------------------- extraction

SCHEMA = {"type": "object", "required": ["name", "age"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": ["string", "null"]}}}


def test_extraction_by_hand() -> None:
    refs = [{"name": "Ann Lee", "age": 41, "city": "Oslo"},
            {"name": "Bo", "age": 7, "city": None},
            {"name": "Cy", "age": 30, "city": "Rome"},
            {"name": "Di", "age": 5, "city": "Bern"}]
    preds = ['  ```json\n{"name": " ann lee ", "age": 41, "city": "OSLO", "extra": "x"}\n```\n',
             '{"name": "Bo", "age": "7"}',  # age as a string: matches, but breaks the schema
             'Sure! {"name": "Cy"}',  # not JSON
             '{"name": "Di", "age": 6, "city": "Bern"}']
    report = extraction_report(refs, preds, SCHEMA, resamples=FAST)
    assert report.json_valid.point == pytest.approx(3 / 4)
    assert report.schema_valid is not None and report.schema_valid.point == pytest.approx(2 / 4)  # items 0, 3
    # (matched, predicted, reference) non-null pairs: (3, 4, 3), (2, 2, 2), (0, 0, 3), (2, 3, 3) -> 7, 9, 11
    assert report.field_precision.point == pytest.approx(7 / 9)
    assert report.field_recall.point == pytest.approx(7 / 11)
    assert report.field_f1.point == pytest.approx(2 * 7 / (9 + 11))
    # name: items 0, 1, 3; age: 0, 1; city: 0, 1 (null and missing agree), 3
    assert {k: (v.exact_match, v.support) for k, v in report.fields.items()} == {
        "name": (3 / 4, 4), "age": (2 / 4, 4), "city": (3 / 4, 4)}
    assert report.all_fields_match.point == pytest.approx(2 / 4)
    assert report.json_valid_items == [True, True, False, True]
    assert report.all_fields_match_items == [True, True, False, False]


def test_extraction_without_schema_and_with_a_broken_one() -> None:
    report = extraction_report([{"a": 1}], ['{"a": 1.0}'], None, resamples=FAST)
    assert report.schema_valid is None and report.field_f1.point == 1.0
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        extraction_report([{"a": 1}], ['{"a": 1}'], {"type": "no-such-type"})
    with pytest.raises(ValueError, match="1 references but 2 predictions"):
        extraction_report([{"a": 1}], ["{}", "{}"], None)


@pytest.mark.parametrize(("answer", "parsed"), [
    ('{"a": 1}', {"a": 1}),
    ('\n  {"a": [1, 2]}  \n', {"a": [1, 2]}),
    ('```json\n{"a": 1}\n```', {"a": 1}),
    ('```JSON {"a": 1}```', {"a": 1}),
    ('```\n{"a": 1}\n```', {"a": 1}),
    ("[1, 2]", None),  # JSON, but not an object
    ('"text"', None),
    ('{"a": NaN}', None),  # not JSON, though Python's json would take it
    ('Here you go: ```json\n{"a": 1}\n```', None),
    ('{"a": 1', None),
    ("", None),
    (None, None),
])
def test_parse_json_object(answer: str | None, parsed: dict[str, object] | None) -> None:
    assert parse_json_object(answer) == parsed


@pytest.mark.parametrize(("reference", "prediction", "same"), [
    ("New York ", "new york", True),
    ("Straße", "STRASSE", True),  # casefold, not lower
    (41, 41.0, True),
    (41, "41", True),  # a number written as a string: the schema check catches the type
    ("41", 41, True),
    (41, "forty-one", False),
    ("41", "41.0", False),  # two strings compare as strings (codes, zip codes)
    (0.5, 0.25, False),
    (True, 1, False),
    (True, "true", False),
    (None, None, True),
    (None, "", False),
    ([" A", "b"], ["a", "B "], True),
    (["a", "b"], ["b", "a"], False),
    ({"x": 1, "y": "Q"}, {"y": "q", "x": 1.0}, True),
    ({"x": 1}, {"x": 1, "y": 2}, False),
])
def test_same_value(reference: object, prediction: object, same: bool) -> None:
    assert same_value(reference, prediction) is same


# --------------------------------------------------------------------------------------- QA


def test_squad_normalisation_and_scores() -> None:
    assert normalize_answer("The  Cat, sat!  ") == "cat sat"
    assert normalize_answer("«Paris» — a city…") == "paris city"  # Unicode punctuation goes too
    assert exact_match("The cat", "cat.") == 1.0
    assert exact_match("cat", "cats") == 0.0
    # ref [quick, brown, fox], pred [quick, red, fox]: 2 shared -> P 2/3, R 2/3, F1 2/3
    assert token_f1("the quick brown fox", "a quick red fox!") == pytest.approx(2 / 3)
    # ref [x, y, y], pred [y, y, y, z]: shared min(2, 3) = 2 -> P 2/4, R 2/3, F1 2PR/(P+R) = 4/7
    assert token_f1("x y y", "y y y z") == pytest.approx(4 / 7)


@pytest.mark.parametrize(("reference", "prediction", "f1"), [
    ("", "", 1.0),
    ("the", "", 1.0),  # only an article: empty after normalisation, like the empty prediction
    ("", "cat", 0.0),
    ("cat", "", 0.0),
    ("cat", None, 0.0),
    ("...", "!!", 1.0),
    ("dog", "cat", 0.0),
])
def test_token_f1_edge_cases(reference: str, prediction: str | None, f1: float) -> None:
    assert token_f1(reference, prediction) == f1


def test_qa_report_means() -> None:
    report = qa_report(["The cat", "dog", "red fox"], ["cat", "a dog!", "fox"], resamples=FAST)
    assert report.exact_match_items == [1.0, 1.0, 0.0]
    assert report.exact_match.point == pytest.approx(2 / 3)
    # third item: P 1/1, R 1/2 -> F1 2/3; mean (1 + 1 + 2/3) / 3 = 8/9
    assert report.token_f1.point == pytest.approx(8 / 9)


def test_perplexity() -> None:
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


# ----------------------------------------------------------------------------------------- bootstrap


def _bernoulli(n: int, p: float, seed: int) -> list[float]:
    return [float(x) for x in np.random.default_rng(seed).random(n) < p]


def test_bootstrap_interval_holds_the_point_and_narrows_with_more_items() -> None:
    small, large = bootstrap_ci(_bernoulli(100, 0.7, 1)), bootstrap_ci(_bernoulli(2000, 0.7, 1))
    for interval in (small, large):
        assert interval.low <= interval.point <= interval.high
    assert large.high - large.low < (small.high - small.low) / 2  # width ~ 1/sqrt(n): 4.5x narrower
    # Bernoulli(0.5) over 400 items: standard error 0.025, so a 95% interval is about 0.098 wide
    half = bootstrap_ci(_bernoulli(400, 0.5, 2))
    assert 0.08 < half.high - half.low < 0.12


def test_bootstrap_is_reproducible_and_the_seed_matters() -> None:
    values = _bernoulli(300, 0.6, 3)
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values, seed=7) != bootstrap_ci(values, seed=8)


def test_bootstrap_does_not_depend_on_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    values = _bernoulli(300, 0.6, 3)
    whole = bootstrap_ci(values)
    monkeypatch.setattr(metrics, "_CHUNK", 1000)  # three resamples at a time
    assert bootstrap_ci(values) == whole


def test_bootstrap_of_constant_values_and_of_a_median() -> None:
    assert bootstrap_ci([0.25] * 50) == Interval(low=0.25, high=0.25, point=0.25)
    median = bootstrap_ci([1.0, 2.0, 3.0, 100.0, 4.0], statistic=np.median, resamples=200)
    assert median.point == 3.0 and median.low >= 1.0 and median.high <= 100.0


def test_bootstrap_metric_sees_the_same_resamples_as_bootstrap_ci() -> None:
    values = np.asarray(_bernoulli(150, 0.4, 4))
    by_metric = bootstrap_metric(len(values), lambda rows: float(values[rows].mean()), resamples=300, seed=5)
    by_mean = bootstrap_ci(values, resamples=300, seed=5)
    assert (by_metric.low, by_metric.high, by_metric.point) == pytest.approx((by_mean.low, by_mean.high, by_mean.point))


def test_report_intervals_agree_with_bootstrap_ci_of_per_item_values() -> None:
    rng = np.random.default_rng(6)
    refs = [str(x) for x in rng.choice(["a", "b"], 200)]
    preds = [r if rng.random() < 0.8 else "?" for r in refs]
    report = classification_report(refs, preds, ["a", "b"], resamples=400, seed=9)
    assert report.accuracy == bootstrap_ci([float(c) for c in report.correct], resamples=400, seed=9)


def test_bootstrap_is_fast() -> None:
    values = _bernoulli(1000, 0.5, 0)
    start = time.perf_counter()
    bootstrap_ci(values, resamples=1000)
    compare(values, _bernoulli(1000, 0.6, 1), resamples=1000)
    qa_report(["a b"] * 1000, ["a"] * 1000, resamples=1000)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(("values", "kwargs"), [([], {}), ([1.0], {"resamples": 0}), ([1.0], {"confidence": 1.0})])
def test_bootstrap_rejects_bad_arguments(values: list[float], kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        bootstrap_ci(values, **kwargs)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=60), st.integers(0, 2**32))
def test_mean_interval_brackets_its_point(values: list[float], seed: int) -> None:
    interval = bootstrap_ci(values, resamples=200, seed=seed)
    assert interval.low - 1e-12 <= interval.point <= interval.high + 1e-12


# ---------------------------------------------------------------------------------------- comparisons


def test_identical_targets_are_level_within_noise() -> None:
    values = _bernoulli(200, 0.6, 10)
    result = compare(values, values)
    assert result.difference == Interval(low=0.0, high=0.0, point=0.0)
    assert not result.significant
    assert describe(result, "base", "tuned") == "tuned and base are level (95% CI 0.0 to 0.0 points): within noise"


def test_a_clear_difference_is_beyond_noise() -> None:
    base, tuned = _bernoulli(200, 0.3, 11), _bernoulli(200, 0.8, 12)
    result = compare(base, tuned)
    assert result.significant and result.difference.low > 0.3
    assert result.b - result.a == pytest.approx(result.difference.point)
    sentence = describe(result, "base", "tuned")
    assert re.fullmatch(r"tuned is \d+\.\d points ahead of base \(95% CI \d+\.\d to \d+\.\d\): beyond noise", sentence)
    backwards = describe(compare(tuned, base), "tuned", "base")
    low, high = map(float, re.findall(r"CI (\S+) to (\S+)\)", backwards)[0])
    assert backwards.startswith("base is") and "points behind tuned" in backwards and 0 < low < high


def test_one_item_of_difference_is_within_noise() -> None:
    base = [0.0] * 100
    tuned = [1.0] + [0.0] * 99  # resamples miss that item about a third of the time
    result = compare(base, tuned)
    assert result.difference.point == pytest.approx(0.01) and not result.significant
    assert describe(result, "base", "tuned").endswith("within noise")


def test_describe_for_a_score_where_lower_is_better() -> None:
    result = Comparison(a=12.0, b=9.5, difference=Interval(low=-3.1, high=-1.9, point=-2.5), significant=True)
    assert describe(result, "base", "tuned", unit="ppl", higher_is_better=False) == (
        "tuned is 2.5 ppl ahead of base (95% CI 1.9 to 3.1): beyond noise")


def test_compare_metric_pairs_macro_f1() -> None:
    rng = np.random.default_rng(13)
    labels = ["a", "b", "c"]
    refs = [str(x) for x in rng.choice(labels, 150)]
    base = [r if rng.random() < 0.4 else str(rng.choice(labels)) for r in refs]
    tuned = [r if rng.random() < 0.9 else None for r in refs]
    result = compare_metric(len(refs), f1_metric(refs, base, labels), f1_metric(refs, tuned, labels), resamples=300)
    assert result.significant and result.b > result.a
    same = compare_metric(len(refs), f1_metric(refs, base, labels), f1_metric(refs, base, labels), resamples=100)
    assert same.difference.point == 0.0 and not same.significant
    with pytest.raises(ValueError, match="same items"):
        compare([1.0, 0.0], [1.0])


def test_metrics_stay_light() -> None:
    code = ("import sys, appliance.evaluate.metrics\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'sklearn', 'jsonschema', 'scipy'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
