"""The task metric during training: label accuracy on (part of) the validation split.

Measured at each evaluation interval with the model being trained, by the same label scoring the
evaluation stage uses (`modeling.AnswerScorer`), so the training curve shows the number the user will
be judged on and early stopping can follow it instead of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.run import Run
from appliance.templating import answer_ids, prompt_ids

MAX_ITEMS = 32


@dataclass
class LabelProbe:
    labels: list[str]
    items: list[tuple[list[int], list[list[int]], str]]  # prompt ids, candidate answers (one per label), label

    @classmethod
    def from_run(cls, run: Run, tokenizer: Any, limit: int = MAX_ITEMS) -> LabelProbe | None:
        """A probe for a classification run with a validation split; None for other tasks."""
        report = run.data_report()
        if report is None or report.task != "classification" or not report.label_set:
            return None
        labels = report.label_set
        items = []
        for item in run.items("val", limit):
            candidates = [answer_ids(tokenizer, item.prompt, label) for label in labels]
            items.append((prompt_ids(tokenizer, item.prompt), candidates, item.label or item.reference))
        return cls(labels, items) if items else None

    def accuracy(self, model: Any) -> float:
        from appliance.modeling import AnswerScorer

        scorer = AnswerScorer(model)  # a new one at each evaluation: the weights have changed since the last
        correct = 0
        for prompt, candidates, label in self.items:
            scores = scorer.score(prompt, candidates)
            correct += self.labels[max(range(len(scores)), key=scores.__getitem__)] == label
        return correct / len(self.items)
