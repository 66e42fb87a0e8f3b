"""Few-shot prompts built from a run's training rows.

Every target is asked the same prompts (`Run.items`: the conversation up to its last assistant turn,
with that turn as the reference). Few-shot prompts put k training examples (question and answer) before the
question, chosen by sentence-embedding similarity to it (the onnxruntime encoder of data
preparation) or at random, so "did fine-tuning beat prompting with examples?" has an answer.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from appliance.run import Item

Message = dict[str, str]


def question(item: Item) -> str:
    """The text the few-shot examples are matched on: the last user turn of the prompt."""
    return next((m["content"] for m in reversed(item.prompt) if m["role"] == "user"), "")


def with_examples(item: Item, examples: list[Item]) -> list[Message]:
    """The prompt with the examples as earlier user/assistant turns, after any system turn."""
    head = [m for m in item.prompt[:1] if m["role"] == "system"]
    shots: list[Message] = []
    for example in examples:
        shots += [{"role": "user", "content": question(example)}, {"role": "assistant", "content": example.reference}]
    return head + shots + item.prompt[len(head):]


def choose_examples(items: list[Item], pool: list[Item], k: int, how: Literal["similar", "random"],
                    store_root: Path, seed: int = 0) -> list[list[Item]]:
    """k examples from `pool` for each item: the most similar questions, or a seeded random draw."""
    if k == 0 or not pool:
        return [[] for _ in items]
    k = min(k, len(pool))
    if how == "random":
        rng = random.Random(seed)
        return [rng.sample(pool, k) for _ in items]
    from appliance.embedder import Embedder, ensure_onnx

    embedder = Embedder(ensure_onnx(store_root))
    asked = embedder.embed([question(i) for i in items])
    known = embedder.embed([question(p) for p in pool])
    similarity = asked @ known.T  # embeddings are normalised: cosine similarity
    chosen = []
    for row, item in zip(similarity, items, strict=True):
        order = [int(j) for j in row.argsort()[::-1] if question(pool[int(j)]) != question(item)]
        chosen.append([pool[j] for j in order[:k]][::-1])  # the most similar example right before the question
    return chosen
