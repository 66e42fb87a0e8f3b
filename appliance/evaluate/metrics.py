"""Scores of one target on the test split, with the noise they carry, and comparisons between targets.

A test split of a few hundred items gives scores that would move by several points on another sample of
the same size, so a difference between the base, few-shot, tuned and quantized models means little
without its uncertainty. Every figure here comes with a bootstrap percentile interval, and targets are
compared on the same resampled items (a paired bootstrap), which cancels the variation between items
that both targets share and so detects smaller real differences than two separate intervals would.

Pure functions over the answers already generated (numpy only): classification matches scikit-learn's
`precision_recall_fscore_support(..., labels=labels, zero_division=0)`, question answering follows
SQuAD's normalisation, and the reports are pydantic models so each one is written as eval/<target>.json.
"""

from __future__ import annotations

import json
import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel

from appliance.records import Interval

OTHER = "<other>"  # the confusion-matrix column of answers outside the label set
_CHUNK = 1 << 22  # resampled cells held in memory at once (32 MiB of int64)

Indices = NDArray[np.intp]
Floats = NDArray[np.float64]
MetricFn = Callable[[Indices], float]  # a score of the items at these indices (repeats allowed)


# ----------------------------------------------------------------------------------------- bootstrap


def _check_bootstrap(n_items: int, resamples: int, confidence: float) -> None:
    if n_items < 1:
        raise ValueError("no items to score")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, not {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie between 0 and 1, not {confidence}")


def _index_chunks(n_items: int, resamples: int, seed: int, width: int = 1) -> Iterator[Indices]:
    """Resamples of item indices (with replacement), a block of rows at a time to bound memory.

    The same (n_items, resamples, seed) always gives the same resamples, whichever metric consumes
    them, so figures of one report and of two targets are computed on the same samples."""
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK // max(n_items, width))
    for start in range(0, resamples, rows):
        yield rng.integers(0, n_items, size=(min(rows, resamples - start), n_items)).astype(np.intp)


def _intervals(points: Floats, stats: Floats, confidence: float) -> list[Interval]:
    """Percentile intervals: `points` has one value per figure, `stats` one row per resample."""
    tail = (1 - confidence) / 2
    lows, highs = np.quantile(stats, [tail, 1 - tail], axis=0)
    return [Interval(low=float(lo), high=float(hi), point=float(p), confidence=confidence)
            for lo, hi, p in zip(np.atleast_1d(lows), np.atleast_1d(highs), np.atleast_1d(points), strict=True)]


def bootstrap_ci(per_item: Sequence[float] | Floats, statistic: Callable[..., Any] = np.mean, resamples: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of `statistic` over per-item values (1.0 correct / 0.0 wrong, an F1...).

    `statistic` is a numpy reduction called with `axis=-1` (np.mean, np.median), so all resamples are
    computed at once. A biased statistic's interval need not contain its point estimate."""
    values = np.asarray(per_item, dtype=np.float64)
    _check_bootstrap(len(values), resamples, confidence)
    stats = np.concatenate([np.asarray(statistic(values[rows], axis=-1), dtype=np.float64)
                            for rows in _index_chunks(len(values), resamples, seed)])
    return _intervals(np.asarray([statistic(values, axis=-1)], dtype=np.float64), stats, confidence)[0]


def bootstrap_metric(n_items: int, metric_fn: MetricFn, resamples: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> Interval:
    """Bootstrap interval of a metric that is not a mean of per-item values (macro F1, micro F1)."""
    _check_bootstrap(n_items, resamples, confidence)
    stats = np.asarray([metric_fn(row) for rows in _index_chunks(n_items, resamples, seed) for row in rows])
    return _intervals(np.asarray([metric_fn(np.arange(n_items))]), stats, confidence)[0]


def _resampled_sums(table: Floats, resamples: int, seed: int) -> Floats:
    """Column sums of `table` (one row per item) in each resample: one row per resample."""
    n_items = len(table)
    sums = []
    for rows in _index_chunks(n_items, resamples, seed):
        offsets = np.arange(len(rows))[:, None] * n_items
        counts = np.bincount((rows + offsets).ravel(), minlength=len(rows) * n_items)
        sums.append(counts.reshape(len(rows), n_items).astype(np.float64) @ table)
    return np.concatenate(sums)


def _ratio(numerator: NDArray[Any], denominator: NDArray[Any]) -> Floats:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    out = np.zeros(np.broadcast(numerator, denominator).shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


# ------------------------------------------------------------------------------------ classification


class LabelScores(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int  # references with this label


class ClassificationReport(BaseModel):
    n: int
    labels: list[str]
    accuracy: Interval
    macro_precision: Interval
    macro_recall: Interval
    macro_f1: Interval
    weighted_precision: Interval
    weighted_recall: Interval
    weighted_f1: Interval
    per_label: dict[str, LabelScores]
    confusion_columns: list[str]  # the labels, then OTHER
    confusion: list[list[int]]  # rows: reference label; columns: predicted label, then OTHER
    out_of_set_rate: float  # answers outside the label set, empty and missing answers included
    correct: list[bool]  # per item, for paired comparisons


_AVERAGES = ("accuracy", "macro_precision", "macro_recall", "macro_f1",
             "weighted_precision", "weighted_recall", "weighted_f1")


def _encode(references: Sequence[str], predictions: Sequence[str | None],
            labels: Sequence[str]) -> tuple[Indices, Indices]:
    """Label indices of references and predictions; a prediction outside `labels` gets len(labels)."""
    problems = []
    if not labels:
        problems.append("no labels given")
    if len(set(labels)) != len(labels):
        problems.append("labels repeat: " + ", ".join(sorted({x for x in labels if labels.count(x) > 1})))
    if any(not label for label in labels):
        problems.append("a label is empty")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({r for r in references if r not in index})
    if unknown:
        problems.append("references outside the label set: " + ", ".join(repr(u) for u in unknown[:10]))
    if len(references) != len(predictions):
        problems.append(f"{len(references)} references but {len(predictions)} predictions")
    if not references:
        problems.append("no items to score")
    if problems:
        raise ValueError("; ".join(problems))
    other = len(labels)
    return (np.asarray([index[r] for r in references], dtype=np.intp),
            np.asarray([index.get(p, other) if p else other for p in predictions], dtype=np.intp))


def _confusions(refs: Indices, preds: Indices, n_labels: int, rows: Indices) -> NDArray[np.int64]:
    """Confusion matrices (reference x predicted-or-OTHER) of each resample in `rows`."""
    width = n_labels * (n_labels + 1)
    cells = refs[rows] * (n_labels + 1) + preds[rows] + np.arange(len(rows))[:, None] * width
    counts = np.bincount(cells.ravel(), minlength=len(rows) * width)
    return counts.reshape(len(rows), n_labels, n_labels + 1).astype(np.int64)


def _label_scores(confusion: NDArray[np.int64]) -> tuple[Floats, Floats, Floats, NDArray[np.int64]]:
    """Per-label precision, recall, F1 and support of a stack of confusion matrices."""
    n_labels = confusion.shape[1]
    true_positives = np.diagonal(confusion, axis1=1, axis2=2)
    predicted = confusion.sum(axis=1)[:, :n_labels]
    support = confusion.sum(axis=2)
    precision = _ratio(true_positives, predicted)
    recall = _ratio(true_positives, support)
    f1 = _ratio(2 * true_positives, predicted + support)  # = 2PR/(P+R), and 0 where both are 0
    return precision, recall, f1, support


def _averages(confusion: NDArray[np.int64]) -> Floats:
    """The figures of _AVERAGES, one row per confusion matrix."""
    precision, recall, f1, support = _label_scores(confusion)
    total = support.sum(axis=1)
    accuracy = np.diagonal(confusion, axis1=1, axis2=2).sum(axis=1) / total
    macro = [score.mean(axis=1) for score in (precision, recall, f1)]
    weighted = [(score * support).sum(axis=1) / total for score in (precision, recall, f1)]
    return np.stack([accuracy, *macro, *weighted], axis=1)


def f1_metric(references: Sequence[str], predictions: Sequence[str | None], labels: Sequence[str],
              average: Literal["macro", "weighted"] = "macro") -> MetricFn:
    """The macro or weighted F1 of the items at given indices: for bootstrap_metric and compare_metric."""
    refs, preds = _encode(references, predictions, labels)
    column = _AVERAGES.index(f"{average}_f1")

    def metric(indices: Indices) -> float:
        return float(_averages(_confusions(refs, preds, len(labels), indices[None, :]))[0, column])

    return metric


def classification_report(references: Sequence[str], predictions: Sequence[str | None], labels: Sequence[str],
                          resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> ClassificationReport:
    """Accuracy, per-label and averaged precision/recall/F1 and the confusion matrix of label answers.

    Predictions are compared to the labels exactly (normalise case and whitespace before); anything
    else, an empty or missing answer included, is out of set: wrong, and counted in the OTHER column."""
    refs, preds = _encode(references, predictions, labels)
    _check_bootstrap(len(refs), resamples, confidence)
    n_labels = len(labels)
    confusion = _confusions(refs, preds, n_labels, np.arange(len(refs))[None, :])
    chunks = _index_chunks(len(refs), resamples, seed, width=n_labels * (n_labels + 1))
    stats = np.concatenate([_averages(_confusions(refs, preds, n_labels, rows)) for rows in chunks])
    figures = dict(zip(_AVERAGES, _intervals(_averages(confusion)[0], stats, confidence), strict=True))
    precision, recall, f1, support = (x[0] for x in _label_scores(confusion))
    per_label = {label: LabelScores(precision=float(precision[i]), recall=float(recall[i]), f1=float(f1[i]),
                                    support=int(support[i])) for i, label in enumerate(labels)}
    return ClassificationReport(
        n=len(refs), labels=list(labels), **figures, per_label=per_label,
        confusion_columns=[*labels, OTHER], confusion=confusion[0].tolist(),
        out_of_set_rate=float(np.mean(preds == n_labels)), correct=(refs == preds).tolist())


# ---------------------------------------------------------------------------------------- extraction

_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n?(.*?)\s*```", re.DOTALL | re.IGNORECASE)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_object(answer: str | None) -> dict[str, Any] | None:
    """The JSON object an answer holds (whole, or as one ```json fenced block), or None if it is not one."""
    if answer is None:
        return None
    text = answer.strip()
    fenced = _FENCE.fullmatch(text)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def same_value(reference: Any, prediction: Any) -> bool:
    """Whether an extracted value is the reference value: strings after stripping and casefolding,
    numbers numerically (a number written as a string counts: the schema check judges the type),
    lists item by item and objects key by key."""
    if _is_number(reference) or _is_number(prediction):
        ref, pred = _number(reference), _number(prediction)
        return ref is not None and pred is not None and ref == pred
    if isinstance(reference, str) and isinstance(prediction, str):
        return reference.strip().casefold() == prediction.strip().casefold()
    if isinstance(reference, list) and isinstance(prediction, list):
        return len(reference) == len(prediction) and all(map(same_value, reference, prediction))
    if isinstance(reference, dict) and isinstance(prediction, dict):
        return reference.keys() == prediction.keys() and all(same_value(v, prediction[k]) for k, v in reference.items())
    return type(reference) is type(prediction) and bool(reference == prediction)  # booleans and null


class FieldScore(BaseModel):
    exact_match: float  # share of items whose answer has the reference value of this field
    support: int  # items whose reference has this field


class ExtractionReport(BaseModel):
    n: int
    json_valid: Interval  # the answer is a JSON object
    schema_valid: Interval | None  # ... that the schema accepts; None without a schema
    field_precision: Interval  # micro, over (field, value) pairs with a non-null value
    field_recall: Interval
    field_f1: Interval
    all_fields_match: Interval  # every field of the reference has its value in the answer
    fields: dict[str, FieldScore]
    json_valid_items: list[bool]  # per item, for paired comparisons
    all_fields_match_items: list[bool]


def _schema_check(schema: dict[str, Any] | None) -> Callable[[dict[str, Any]], bool] | None:
    if schema is None:
        return None
    import jsonschema  # only needed with a schema

    validator_class = jsonschema.validators.validator_for(schema)
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as error:
        raise ValueError(f"the extraction schema is not a valid JSON Schema: {error.message}") from error
    validator = validator_class(schema)
    return lambda instance: bool(validator.is_valid(instance))


def _item_counts(reference: dict[str, Any], answer: dict[str, Any] | None) -> tuple[int, int, int, dict[str, bool]]:
    """Matched, predicted and reference (field, value) pairs with a non-null value, and each reference
    field's match (a null reference value matches a null or missing field; a null field is no pair)."""
    if answer is None:
        return 0, 0, sum(v is not None for v in reference.values()), dict.fromkeys(reference, False)
    matches = {field: same_value(value, answer.get(field)) for field, value in reference.items()}
    matched = sum(match for field, match in matches.items() if reference[field] is not None)
    predicted = sum(v is not None for v in answer.values())
    return matched, predicted, sum(v is not None for v in reference.values()), matches


def extraction_report(references: Sequence[dict[str, Any]], predictions: Sequence[str | None],
                      schema: dict[str, Any] | None = None, resamples: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> ExtractionReport:
    """JSON and schema validity of extraction answers and how many reference fields they got right."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    _check_bootstrap(len(references), resamples, confidence)
    schema_ok = _schema_check(schema)
    answers = [parse_json_object(p) for p in predictions]
    rows, field_hits = [], Counter[str]()
    field_support = Counter[str]()
    for reference, answer in zip(references, answers, strict=True):
        matched, predicted, expected, matches = _item_counts(reference, answer)
        field_support.update(matches.keys())
        field_hits.update(field for field, match in matches.items() if match)
        valid_schema = answer is not None and schema_ok is not None and schema_ok(answer)
        rows.append([answer is not None, valid_schema, matched, predicted, expected,
                     answer is not None and all(matches.values())])
    table = np.asarray(rows, dtype=np.float64)
    sums = np.concatenate([table.sum(axis=0)[None, :], _resampled_sums(table, resamples, seed)])
    valid, valid_schema, matched, predicted, expected, all_match = sums.T
    figures = np.stack([valid / len(table), valid_schema / len(table), _ratio(matched, predicted),
                        _ratio(matched, expected), _ratio(2 * matched, predicted + expected),
                        all_match / len(table)], axis=1)
    json_ok, schema_figure, precision, recall, f1, all_ok = _intervals(figures[0], figures[1:], confidence)
    return ExtractionReport(
        n=len(table), json_valid=json_ok, schema_valid=schema_figure if schema is not None else None,
        field_precision=precision, field_recall=recall, field_f1=f1, all_fields_match=all_ok,
        fields={field: FieldScore(exact_match=field_hits[field] / support, support=support)
                for field, support in field_support.items()},
        json_valid_items=table[:, 0].astype(bool).tolist(), all_fields_match_items=table[:, 5].astype(bool).tolist())


# --------------------------------------------------------------------------------- chat and QA

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation (any Unicode punctuation too), the articles
    a/an/the and extra whitespace."""
    text = "".join(char for char in text.lower() if not _is_punctuation(char))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(reference: str, prediction: str | None) -> float:
    """1.0 when the answers are equal after normalize_answer, else 0.0."""
    return float(normalize_answer(reference) == normalize_answer(prediction or ""))


def token_f1(reference: str, prediction: str | None) -> float:
    """SQuAD's token F1: the overlap of normalised words; 1.0 if both are empty, 0.0 if one is."""
    ref_tokens = normalize_answer(reference).split()
    pred_tokens = normalize_answer(prediction or "").split()
    if not ref_tokens or not pred_tokens:
        return float(ref_tokens == pred_tokens)
    same = sum((Counter(ref_tokens) & Counter(pred_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


class QAReport(BaseModel):
    n: int
    exact_match: Interval
    token_f1: Interval
    exact_match_items: list[float]  # per item, for paired comparisons
    token_f1_items: list[float]


def qa_report(references: Sequence[str], predictions: Sequence[str | None], resamples: int = 1000,
              confidence: float = 0.95, seed: int = 0) -> QAReport:
    """Mean exact match and token F1 of free-text answers, each with its bootstrap interval."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    _check_bootstrap(len(references), resamples, confidence)
    table = np.asarray([[exact_match(r, p), token_f1(r, p)] for r, p in zip(references, predictions, strict=True)])
    means = _resampled_sums(table, resamples, seed) / len(table)
    em, f1 = _intervals(table.mean(axis=0), means, confidence)
    return QAReport(n=len(table), exact_match=em, token_f1=f1, exact_match_items=table[:, 0].tolist(),
                    token_f1_items=table[:, 1].tolist())


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp of the mean negative log-likelihood per token (natural log); inf when that overflows."""
    if tokens < 1:
        raise ValueError("perplexity needs at least one token")
    mean = nll_sum / tokens
    return math.inf if mean > 709 else math.exp(mean)  # exp(710) overflows a float


# ------------------------------------------------------------------------------------ comparisons


class Comparison(BaseModel):
    a: float  # the score of target a on all items
    b: float
    difference: Interval  # b - a, with its paired bootstrap interval
    significant: bool  # the interval excludes 0


def _comparison(a: float, b: float, difference: Interval) -> Comparison:
    return Comparison(a=a, b=b, difference=difference, significant=difference.low > 0 or difference.high < 0)


def compare(per_item_a: Sequence[float] | Floats, per_item_b: Sequence[float] | Floats, resamples: int = 1000,
            confidence: float = 0.95, seed: int = 0) -> Comparison:
    """Difference of the means of b and a over the same items, resampled together (paired)."""
    a, b = np.asarray(per_item_a, dtype=np.float64), np.asarray(per_item_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a paired comparison needs the same items: {a.size} against {b.size}")
    return _comparison(float(a.mean()), float(b.mean()),
                       bootstrap_ci(b - a, resamples=resamples, confidence=confidence, seed=seed))


def compare_metric(n_items: int, metric_a: MetricFn, metric_b: MetricFn, resamples: int = 1000,
                   confidence: float = 0.95, seed: int = 0) -> Comparison:
    """Paired comparison of a metric that is not a mean (macro F1): both metrics see the same resamples."""
    difference = bootstrap_metric(n_items, lambda rows: metric_b(rows) - metric_a(rows), resamples, confidence, seed)
    everything = np.arange(n_items)
    return _comparison(metric_a(everything), metric_b(everything), difference)


def describe(comparison: Comparison, name_a: str, name_b: str, unit: str = "points",
             higher_is_better: bool = True) -> str:
    """The sentence a user reads, e.g. "tuned is 12.3 points ahead of base (95% CI 6.1 to 18.0): beyond noise".

    With unit "points" the scores are fractions shown as percentage points; other units are shown as is."""
    scale = 100.0 if unit == "points" else 1.0
    d = comparison.difference
    point, low, high = d.point * scale, d.low * scale, d.high * scale
    verdict = "beyond noise" if comparison.significant else "within noise"
    ci = f"{d.confidence * 100:g}% CI"
    if _one_decimal(point) == "0.0":
        return f"{name_b} and {name_a} are level ({ci} {_one_decimal(low)} to {_one_decimal(high)} {unit}): {verdict}"
    direction = "ahead of" if (point > 0) == higher_is_better else "behind"
    if point < 0:  # "3.0 points behind (CI 1.0 to 5.0)", not "-3.0 points (CI -5.0 to -1.0)"
        point, low, high = -point, -high, -low
    return (f"{name_b} is {_one_decimal(point)} {unit} {direction} {name_a} "
            f"({ci} {_one_decimal(low)} to {_one_decimal(high)}): {verdict}")


def _one_decimal(value: float) -> str:
    return f"{round(value, 1) + 0.0:.1f}"  # + 0.0 turns -0.0 into 0.0
