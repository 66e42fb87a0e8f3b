"""The GPU check's dry run: `bench/gpu/check.sh --cpu` runs here the very script a lent GPU machine runs, with a tiny
model, so that it cannot rot between the calls that get a GPU. Its table must have every row of the real check;
what a CPU can do must pass (through the CLI, in the check's own store); what needs CUDA must say why it was
skipped."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROWS = ["import: default model", "import: random model", "data: prepare the sample", "train: unsloth", "train: hf",
        "plan vs peak: unsloth", "plan vs peak: hf", "kill -9 and resume", "export: merge, convert, gate",
        "merge on the GPU", "CUDA llama.cpp build", "decode: CPU", "decode: GPU", "peer: transformers+peft+bnb"]
CPU_ROWS = ["import: default model", "import: random model", "data: prepare the sample", "train: hf",
            "plan vs peak: hf", "kill -9 and resume", "export: merge, convert, gate", "merge on the GPU", "decode: CPU"]
UNSLOTH_ROWS = ["train: unsloth", "plan vs peak: unsloth"]  # Unsloth's CPU fallback, where it is installed
GPU_ROWS = ["CUDA llama.cpp build", "decode: GPU", "peer: transformers+peft+bnb"]


def number(pattern: str, text: str, group: int = 1) -> float:
    found = re.search(pattern, text)
    assert found is not None, (pattern, text)
    return float(found.group(group).replace(",", ""))


def parse(table: str) -> dict[str, tuple[str, str]]:
    """step -> (status, result), from the columns the dashed line under the header marks."""
    lines = table.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    spans = [m.span() for m in re.finditer(r"-+", lines[rule])]
    rows = {}
    for line in lines[rule + 1:]:
        if not line.strip():
            break
        rows[line[:spans[0][1]].strip()] = (line[spans[1][0]:spans[1][1]].strip(), line[spans[3][0]:].strip())
    return rows


@pytest.mark.slow
def test_the_gpu_check_dry_run_passes_what_a_cpu_can_and_names_what_it_cannot(tmp_path: Path) -> None:
    out = tmp_path / "check.out.txt"
    done = subprocess.run(["bash", "bench/gpu/check.sh", "--cpu", "--work", str(tmp_path / "work"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    table = out.read_text(encoding="utf-8")
    assert table.strip() == done.stdout.strip()  # the table printed is the table written
    assert table.startswith("CPU dry run: ")
    rows = parse(table)
    assert list(rows) == ROWS
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    for step in CPU_ROWS + (UNSLOTH_ROWS if has_unsloth else []):
        assert rows[step][0] == "ok", (step, rows[step])
    for step in GPU_ROWS + ([] if has_unsloth else UNSLOTH_ROWS):
        status, why = rows[step]
        assert status == "skipped" and len(why) > 10, (step, rows[step])

    loss = r"loss ([\d.]+) -> ([\d.]+)"
    assert number(loss, rows["train: hf"][1], 2) < number(loss, rows["train: hf"][1], 1)
    assert 0.9 <= number(r"ratio ([\d.]+)", rows["plan vs peak: hf"][1]) <= 4
    assert "--resume from checkpoint 2" in rows["kill -9 and resume"][1]
    assert "gate passed" in rows["export: merge, convert, gate"][1]
    assert number(r"([\d,.]+) tok/s", rows["decode: CPU"][1]) > 0
    assert "needs CUDA" in rows["peer: transformers+peft+bnb"][1]
    assert "no step failed" in out.with_suffix(".log").read_text(encoding="utf-8")
