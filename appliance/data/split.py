"""Deterministic train/validation/test splits, stratified by label when there are labels."""

from __future__ import annotations

import random
from collections import defaultdict


def assign(labels: list[str | None], fractions: tuple[float, float, float], seed: int,
           stratify: bool) -> list[str]:
    """One of "train", "val", "test" per row; the same inputs always give the same answer."""
    groups: dict[str | None, list[int]] = defaultdict(list)
    for row, label in enumerate(labels):
        groups[label if stratify else None].append(row)
    out = ["train"] * len(labels)
    rng = random.Random(seed)
    for key in sorted(groups, key=lambda k: (k is None, str(k))):
        rows = groups[key]
        rng.shuffle(rows)
        n_val, n_test = round(len(rows) * fractions[1]), round(len(rows) * fractions[2])
        if len(rows) - n_val - n_test < 1 and len(rows) > 0:  # keep at least one training row
            n_test = max(0, len(rows) - n_val - 1)
        for row in rows[:n_val]:
            out[row] = "val"
        for row in rows[n_val:n_val + n_test]:
            out[row] = "test"
    return out
