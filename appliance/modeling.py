"""Log-likelihood of answer tokens, shared by training (the loss, the label probe) and evaluation (label
scoring).

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


def score_answers(model: Any, prompt: list[int], answers: list[list[int]]) -> list[float]:
    """The log-likelihood of each answer after the prompt. The prompt runs once; its cache is repeated for
    the answers, which then run together as one batch, padded on the right (a causal model never looks
    ahead, so the padding changes no real position). Two forwards per prompt however many labels."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        scores = [float(first[answer[0]]) for answer in answers]
        longer = [i for i, answer in enumerate(answers) if len(answer) > 1]
        if not longer:
            return scores
        width = max(len(answers[i]) - 1 for i in longer)
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(longer))
        rows = [answers[i][:-1] + [answers[i][0]] * (width - len(answers[i]) + 1) for i in longer]
        logits = model(input_ids=torch.tensor(rows, device=device), past_key_values=cache, use_cache=True).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        for row, i in enumerate(longer):
            following = torch.tensor(answers[i][1:], device=device)
            scores[i] += float(log_probs[row, torch.arange(len(following), device=device), following].sum())
    return scores
