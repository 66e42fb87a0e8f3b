"""The task metric during training: label accuracy on (part of) the validation split.

Measured at each evaluation interval with the model being trained, by the same label scoring the
evaluation stage uses, so the training curve shows the number the user will be judged on and
early stopping can follow it instead of the loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.evaluate.encoding import answer_ids, prompt_ids
from appliance.evaluate.items import load_items

MAX_ITEMS = 32


@dataclass
class LabelProbe:
    labels: list[str]
    items: list[tuple[list[int], list[list[int]], str]]  # prompt ids, candidate answers (one per label), label

    @classmethod
    def from_run(cls, run_dir: Path, tokenizer: Any, limit: int = MAX_ITEMS) -> LabelProbe | None:
        """A probe for a classification run with a validation split; None for other tasks."""
        report_path = run_dir / "data" / "data_report.json"
        if not report_path.is_file():
            return None
        report = json.loads(report_path.read_text(encoding="utf-8"))
        labels = (report.get("labels") or {}).get("set") or []
        if (report.get("config") or {}).get("task") != "classification" or not labels:
            return None
        items = []
        for item in load_items(run_dir / "data" / "val.jsonl", limit):
            candidates = [answer_ids(tokenizer, item.prompt, label) for label in labels]
            items.append((prompt_ids(tokenizer, item.prompt), candidates, item.label or item.reference))
        return cls(labels, items) if items else None

    def accuracy(self, model: Any) -> float:
        from appliance.evaluate.targets import HFTarget

        target = HFTarget.around("training", model)
        correct = 0
        for prompt, candidates, label in self.items:
            scores = target.score(prompt, candidates)
            correct += self.labels[max(range(len(scores)), key=scores.__getitem__)] == label
        return correct / len(self.items)
