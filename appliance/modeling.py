"""Log-likelihood of answer tokens, shared by training (the loss) and evaluation (label scoring).

With answers a small share of each row, projecting every position onto the vocabulary (what a plain
forward with labels does) spends most of the time and memory on logits that carry no loss. We run
the decoder, then the output head on the answer positions only. Models whose head is not a plain
projection (logit soft-capping, scaling) take the ordinary path.
"""

from __future__ import annotations

from typing import Any

IGNORE = -100


def answer_nll(model: Any, batch: dict[str, Any]) -> Any:
    """Summed negative log-likelihood of each row's answer tokens (labels != IGNORE): a (rows,) tensor."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = getattr(base, "model", None), getattr(base, "lm_head", None)
    config = getattr(base, "config", None)
    special_head = any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale"))
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    rows = keep.nonzero()[:, 0]
    if decoder is None or head is None or special_head:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    else:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    losses = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="none")
    return torch.zeros(targets.shape[0], dtype=losses.dtype, device=losses.device).index_add_(0, rows, losses)
