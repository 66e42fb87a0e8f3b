"""Length statistics of templated rows: the histogram, truncation, and what padded batches and packing
make of them (they decide the sequence length and batching of training)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np


def _fine_bins(lengths: Any, target: int = 16) -> dict[str, list[int]]:
    """About `target` equal bins of a round width (1, 2 or 5 times a power of ten) from 0 to the longest."""
    longest = int(lengths.max())
    width = 1
    while width * target < longest:
        for factor in (2, 2.5, 2):  # 1 -> 2 -> 5 -> 10 -> 20 -> 50 ...
            width = int(width * factor)
            if width * target >= longest:
                break
    edges = list(range(0, longest + width, width)) or [0, width]
    counts, _ = np.histogram(lengths, bins=edges)
    return {"edges": edges, "counts": [int(c) for c in counts]}


def length_stats(lengths: list[int], trained: list[int], max_seq_len: int, batch_size: int = 4,
                 seed: int = 0) -> dict[str, Any]:
    """Histogram, truncation count, and the token efficiency of padded batches vs packing."""
    if not lengths:
        return {"rows": 0}
    arr = np.asarray(lengths)
    clipped = np.minimum(arr, max_seq_len)
    edges = [0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 10**9]
    counts, _ = np.histogram(arr, bins=edges)
    histogram = {f"{lo}-{hi - 1}" if hi < 10**9 else f">={lo}": int(c)
                 for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True) if c}
    order = list(range(len(clipped)))
    random.Random(seed).shuffle(order)  # training shuffles; padding goes to each batch's longest
    padded = sum(int(clipped[order[i:i + batch_size]].max()) * len(order[i:i + batch_size])
                 for i in range(0, len(order), batch_size))
    bins: list[int] = []  # first-fit decreasing into max_seq_len-token sequences
    for length in sorted(clipped.tolist(), reverse=True):
        for b, used in enumerate(bins):
            if used + length <= max_seq_len:
                bins[b] += length
                break
        else:
            bins.append(length)
        if len(bins) > 20000:  # enough to estimate; the rest packs the same way
            break
    packed_tokens = sum(bins)
    return {
        "rows": len(lengths),
        "tokens": int(arr.sum()),
        "trained_tokens": int(sum(trained)),
        "min": int(arr.min()), "mean": round(float(arr.mean()), 1),
        "p50": int(np.percentile(arr, 50)), "p95": int(np.percentile(arr, 95)), "max": int(arr.max()),
        "histogram": histogram,
        "bins": _fine_bins(arr),
        "truncated": int((arr > max_seq_len).sum()),
        "max_seq_len": max_seq_len,
        "padding_efficiency": round(float(clipped.sum()) / padded, 3),
        "packing_efficiency": round(packed_tokens / (len(bins) * max_seq_len), 3),
    }
