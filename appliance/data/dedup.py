"""Exact and near-duplicate removal, and the contamination check across splits."""

from __future__ import annotations

import hashlib
import re

import numpy as np

_WS = re.compile(r"\s+")
_BLOCK = 1024


def exact_key(messages: list[dict[str, str]]) -> int:
    """Same key for conversations that differ only in case and whitespace (a 64-bit hash)."""
    digest = hashlib.blake2b(digest_size=8)
    for message in messages:
        digest.update(message["role"].encode())
        digest.update(b"\x00")
        digest.update(_WS.sub(" ", message["content"]).strip().casefold().encode())
        digest.update(b"\x01")
    return int.from_bytes(digest.digest(), "little")


def near_duplicates(embeddings: np.ndarray, threshold: float) -> dict[int, tuple[int, float]]:
    """Rows that nearly repeat an earlier kept row: {row: (kept row it repeats, cosine)}.

    Exact: each row is compared with every row kept before it, block by block, so memory stays
    at one block of similarities whatever the number of rows.
    """
    duplicates: dict[int, tuple[int, float]] = {}
    kept: list[int] = []
    for start in range(0, len(embeddings), _BLOCK):
        block = embeddings[start:start + _BLOCK]
        best_prev = np.full(len(block), -1.0, dtype=np.float32)
        arg_prev = np.full(len(block), -1, dtype=np.int64)
        for kstart in range(0, len(kept), _BLOCK * 4):
            chunk = kept[kstart:kstart + _BLOCK * 4]
            sims = block @ embeddings[chunk].T
            idx = sims.argmax(axis=1)
            val = sims[np.arange(len(block)), idx]
            better = val > best_prev
            best_prev[better] = val[better]
            arg_prev[better] = np.asarray(chunk)[idx[better]]
        within = block @ block.T
        accepted: list[int] = []
        for i in range(len(block)):
            row = start + i
            if best_prev[i] >= threshold:
                duplicates[row] = (int(arg_prev[i]), float(best_prev[i]))
                continue
            if accepted:
                sims_in = within[i, accepted]
                j = int(sims_in.argmax())
                if sims_in[j] >= threshold:
                    duplicates[row] = (start + accepted[j], float(sims_in[j]))
                    continue
            accepted.append(i)
        kept.extend(start + i for i in accepted)
    return duplicates


def contaminated(eval_emb: np.ndarray, train_emb: np.ndarray, threshold: float) -> dict[int, float]:
    """Evaluation rows whose nearest training row is at least `threshold` similar: {row: cosine}."""
    found: dict[int, float] = {}
    if len(eval_emb) == 0 or len(train_emb) == 0:
        return found
    for start in range(0, len(eval_emb), _BLOCK):
        best = np.full(min(_BLOCK, len(eval_emb) - start), -1.0, dtype=np.float32)
        for tstart in range(0, len(train_emb), _BLOCK * 4):
            sims = eval_emb[start:start + _BLOCK] @ train_emb[tstart:tstart + _BLOCK * 4].T
            best = np.maximum(best, sims.max(axis=1))
        for i in np.nonzero(best >= threshold)[0]:
            found[start + int(i)] = float(best[i])
    return found
