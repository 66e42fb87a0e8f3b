"""Records of a run as the stages write them, built from the record models (never hand-written JSON), for
tests that need a run at some stage without running the stages: the TUI's screens and snapshots, the
integrity check, the manifest."""

from __future__ import annotations

from appliance.config import DataConfig
from appliance.records import (
    BaseModelInputs,
    Bins,
    Check,
    ComparisonRow,
    Contaminated,
    Contamination,
    Counts,
    DataReport,
    Duplicate,
    Duplicates,
    EvalResult,
    FileEntry,
    FileReport,
    InputFile,
    Interval,
    Labels,
    Lengths,
    Manifest,
    ManifestInputs,
    PiiPreview,
    PiiReport,
    Problem,
    Signature,
    TargetResult,
    TargetRow,
    Verification,
)
from appliance.store import Store
from appliance.templating import ChatContract, Turn

LABELS = ["billing", "network", "printer"]
REFERENCES = ["billing", "network", "printer", "network"]
ANSWERS = {"base": ["network", "network", "billing", "printer"], "tuned": REFERENCES}
SOURCE = "/data/tickets.csv"


def data_report(store: Store, task: str = "classification") -> DataReport:
    return DataReport(
        counts=Counts(rows_read=480, invalid=2, duplicates_exact=14, train=370, val=47, test=47, moved_to_train=3),
        formats={SOURCE: "table"},
        problems=[Problem(file=SOURCE, line=17, field="category", reason="empty label"),
                  Problem(file=SOURCE, line=212, reason="row has 4 columns, the header has 3")],
        pii=PiiReport(mode="redact", rows_with_pii=2, counts={"EMAIL": 2, "PHONE": 1},
                      masked_samples={"EMAIL": ["a**@****.**", "b*@*****.***"], "PHONE": ["+* *** *** ****"]},
                      previews=[PiiPreview(source=f"{SOURCE}:3", role="user", types=["EMAIL", "PHONE"],
                                           before="I am a**@****.**, call +* *** *** ****",
                                           after="I am <EMAIL_1>, call <PHONE_1>")]),
        duplicates=Duplicates(exact=[Duplicate(source=f"{SOURCE}:9", duplicate_of=f"{SOURCE}:4")]),
        contamination=Contamination(checked=True, threshold=0.9, rows=[Contaminated(source=f"{SOURCE}:44",
                                                                                     cosine=0.931)]),
        labels=Labels(set=LABELS, distribution={"train": {"billing": 120, "network": 130, "printer": 120},
                                                "val": {"billing": 15, "network": 17, "printer": 15},
                                                "test": {"billing": 16, "network": 16, "printer": 15}}),
        lengths=Lengths(rows=464, p50=86, p95=102, max=111, max_seq_len=1024, padding_efficiency=0.89,
                        packing_efficiency=0.96, bins=Bins(edges=[0, 20, 40, 60, 80, 100, 120],
                                                           counts=[0, 0, 12, 150, 260, 42])),
        inputs=[InputFile(path=SOURCE, sha256="a" * 64, bytes=84_837)],
        config=DataConfig(inputs=[SOURCE], task=task, label_field="category", store=str(store.root)),
    )


def _score(correct: int) -> Interval:
    return Interval(point=correct / 4, low=max(0.0, correct / 4 - 0.25), high=min(1.0, correct / 4 + 0.25))


def evaluations() -> list[TargetResult]:
    results = []
    for name, predicted in ANSWERS.items():
        correct = sum(a == b for a, b in zip(predicted, REFERENCES, strict=True))
        matrix = [[sum(1 for r, p in zip(REFERENCES, predicted, strict=True) if r == t and p == q) for q in LABELS]
                  for t in LABELS]
        results.append(TargetResult(
            target=name, n=4, primary="accuracy", score=_score(correct), per_item=[], size_bytes=270_000_000,
            tokens_per_s=40.0, seconds=1.0, predictions=predicted, samples=[{"reference": r} for r in REFERENCES],
            report={"labels": LABELS, "confusion_columns": LABELS, "confusion": matrix}))
    return results


def comparison(run: str) -> EvalResult:
    rows = [TargetRow(target=r.target, score=r.score, macro_f1=r.score, size_bytes=r.size_bytes, tokens_per_s=40.0)
            for r in evaluations()]
    return EvalResult(run=run, task="classification", split="test", n=4, primary="accuracy", targets=rows,
                      comparisons=[ComparisonRow(
                          baseline="base", target="tuned", metric="accuracy", baseline_score=0.25, target_score=1.0,
                          difference=Interval(point=0.75, low=0.25, high=1.0), significant=True,
                          sentence="tuned is 75.0 points ahead of base (95% CI 25.0 to 100.0): beyond noise")],
                      note="evaluate the tuned model and at least one exported GGUF to get a recommendation")


def contract() -> ChatContract:
    turn = {role: Turn(prefix=f"<|im_start|>{role}\n", suffix="<|im_end|>\n") for role in ("system", "user",
                                                                                          "assistant")}
    return ChatContract(template="{{ messages }}", eos_token="<|im_end|>", eos_id=2, bos_token=None, bos_id=None,
                        stop_tokens=["<|im_end|>"], stop_ids=[2], turns=turn,
                        generation_prompt="<|im_start|>assistant\n", default_system=None, system=None,
                        task="classification", labels=LABELS)


def verification(run: str, name: str = "demo-cccccc") -> Verification:
    checks = [Check(name="chat template", status="pass", detail="identical to the training template"),
              Check(name="greedy parity", status="pass", detail="same greedy tokens as the merged model"),
              Check(name="stops", status="warn", detail="ended its turn on 5 of 6 prompts")]
    return Verification(run=run, name=name, contract=contract(), files=[
        FileReport(file=f"{name}-F16.gguf", quant="F16", size_bytes=270_885_792, checks=checks, agreement=1.0),
        FileReport(file=f"{name}-Q8_0.gguf", quant="Q8_0", size_bytes=144_810_912, checks=checks, agreement=0.96,
                   ppl_delta=0.0171)])


def manifest(run: str) -> Manifest:
    return Manifest(
        run=run, created="2026-11-03T09:00:00+00:00", versions={"appliance": "0.1.0", "llama.cpp": "0.3.36"},
        signature=Signature(algorithm="ed25519", key_id="0123456789abcdef"),
        inputs=ManifestInputs(data=[InputFile(path=SOURCE, sha256="a" * 64, bytes=84_837)],
                              base_model=BaseModelInputs(name="smollm2-135m-instruct", files={
                                  "config.json": FileEntry(sha256="b" * 64, bytes=818)})),
        files={"adapter/adapter_model.safetensors": FileEntry(sha256="c" * 64, bytes=9_823_216),
               "gguf/demo-cccccc-Q8_0.gguf": FileEntry(sha256="d" * 64, bytes=144_810_912)})
