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


def shared_length(held: list[int], wanted: list[int]) -> int:
    """How many tokens two sequences share from their start (what a cache of `held` can serve `wanted`)."""
    common = 0
    for a, b in zip(held, wanted, strict=False):
        if a != b:
            break
        common += 1
    return common


class AnswerScorer:
    """The log-likelihood of candidate answers after prompts, with a model whose weights do not change
    while it scores.

    Prompts of one evaluation share their beginning (the chat template's header, the system prompt,
    few-shot examples): the cache of what the prompts seen so far share is kept, and each prompt runs
    only what follows it. The candidates then run together as one batch over the prompt's cache,
    repeated, padded on the right (a causal model never looks ahead, so padding changes no real
    position): two forwards per prompt, however many labels.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.shared: list[int] = []  # what the cache holds: the beginning of every prompt scored so far
        self.cache: Any = None

    def _prompt(self, prompt: list[int]) -> Any:
        """The forward over `prompt` (its last position's logits), from a copy of the shared cache."""
        import copy

        import torch

        if self.cache is not None:
            common = shared_length(self.shared, prompt[:-1])
            if common == 0:
                self.cache = None
            elif common < len(self.shared):
                self.cache.crop(common - len(self.shared))  # a negative count: that many from the end
                self.shared = self.shared[:common]
        if self.cache is None:  # all but the last token of this prompt is what is shared so far
            self.shared = prompt[:-1]
            if self.shared:
                self.cache = self.model(input_ids=torch.tensor([self.shared], device=self.device),
                                        use_cache=True, logits_to_keep=1).past_key_values
        cache = copy.deepcopy(self.cache) if self.shared else None
        rest = torch.tensor([prompt[len(self.shared):]], device=self.device)
        return self.model(input_ids=rest, past_key_values=cache, use_cache=True, logits_to_keep=1)

    def score(self, prompt: list[int], answers: list[list[int]]) -> list[float]:
        import torch

        with torch.no_grad():
            out = self._prompt(prompt)
            first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            scores = [float(first[answer[0]]) for answer in answers]
            longer = [i for i, answer in enumerate(answers) if len(answer) > 1]
            if not longer:
                return scores
            width = max(len(answers[i]) - 1 for i in longer)
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(longer))
            rows = [answers[i][:-1] + [answers[i][0]] * (width - len(answers[i]) + 1) for i in longer]
            logits = self.model(input_ids=torch.tensor(rows, device=self.device), past_key_values=cache,
                                use_cache=True).logits
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(longer):
                following = torch.tensor(answers[i][1:], device=self.device)
                scores[i] += float(log_probs[row, torch.arange(len(following), device=self.device), following].sum())
        return scores
