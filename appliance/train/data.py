"""Training batches from a run's prepared splits: templated with the base model's chat template,
labels only on assistant tokens, grouped by length so little compute goes to padding, and in an
order that is a pure function of (seed, epoch), so a resumed run sees exactly the same batches."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.modeling import IGNORE


@dataclass(slots=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


def load_split(path: Path, tokenizer: Any, max_seq_len: int) -> tuple[list[Encoded], int]:
    """Encoded rows of one split, and how many were truncated."""
    from appliance.templating import encode

    rows: list[Encoded] = []
    truncated = 0
    if not path.is_file():
        return rows, truncated
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            ids, trained = encode(tokenizer, json.loads(line)["messages"])
            if len(ids) > max_seq_len:
                truncated += 1
                ids, trained = ids[:max_seq_len], trained[:max_seq_len]
            if not any(trained):
                continue  # truncation cut every answer token: nothing to learn from this row
            rows.append(Encoded(ids, [t if keep else IGNORE for t, keep in zip(ids, trained, strict=True)]))
    return rows, truncated


def epoch_batches(rows: list[Encoded], batch_size: int, seed: int, epoch: int, grouped: bool) -> list[list[int]]:
    """Row indices of each batch of one epoch. Length grouping sorts within shuffled windows of
    50 batches and then shuffles the batches, so batches are uniform but their order is random."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(rows)))
    rng.shuffle(order)
    if grouped:
        window = batch_size * 50
        grouped_order: list[int] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: len(rows[i].input_ids), reverse=True)
            grouped_order.extend(chunk)
        order = grouped_order
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if grouped:
        rng.shuffle(batches)
    return batches


def collate(rows: list[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors; padding is masked out of attention and loss."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
