"""The layers hold: no import points up or sideways (tests/layers.py reads every import statement, and a
planted sideways import is caught); the TUI and the light core modules never pull in the heavy ML stack;
the core never pulls in Textual (checked in fresh interpreters, since this process has imported
everything)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import layers
import pytest
from conftest import REPO

HEAVY = ("torch", "transformers", "unsloth", "llama_cpp", "peft", "trl", "onnxruntime", "datasets")


def _modules_after_import(*modules: str) -> set[str]:
    code = (f"import json, sys\nfor m in {list(modules)!r}: __import__(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


LIGHT = ["tui", "tui.app", "tui.screens.home", "tui.screens.train", "tui.screens.chat", "tui.screens.new_run",
         "tui.screens.sweep", "tui.screens.serve", "tui.widgets.form", "appliance.runs", "appliance.serve.model",
         "appliance.serve.server", "appliance.serve.chat", "appliance.config", "appliance.store", "appliance.events",
         "appliance.jobs", "appliance.cli", "appliance.doctor", "appliance.toolchain", "appliance.hardware",
         "appliance.data.prepare", "appliance.export.run", "appliance.manifest", "appliance.run",
         "appliance.records", "appliance.fields", "appliance.templating", "appliance.planner", "appliance.pii",
         "appliance.quants", "appliance.endpoint", "appliance.sweep"]


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_do_not_import_the_ml_stack(module: str) -> None:
    loaded = _modules_after_import(module)
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}


@pytest.mark.parametrize("module", ["appliance.cli", "appliance.importer", "appliance.worker", "appliance.run",
                                    "appliance.jobs", "appliance.doctor", "appliance.runs", "appliance.serve.server",
                                    "appliance.endpoint", "appliance.sweep"])
def test_core_does_not_import_textual(module: str) -> None:
    assert not {m for m in _modules_after_import(module) if m.split(".")[0] == "textual"}


def test_help_is_fast_and_light() -> None:
    result = subprocess.run([sys.executable, "-m", "appliance", "--help"], capture_output=True,
                            text=True, check=True)
    assert "doctor" in result.stdout and "models" in result.stdout


def test_no_import_points_up_or_sideways() -> None:
    assert layers.violations(REPO) == []


def test_a_planted_sideways_or_upward_import_is_caught(tmp_path: Path) -> None:
    for package in ("appliance", "tui"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "appliance" / "data" / "clean.py", "a", encoding="utf-8") as handle:
        handle.write("\n\ndef _planted() -> None:\n    from appliance.export import gate  # noqa\n")
    with open(tmp_path / "appliance" / "run.py", "a", encoding="utf-8") as handle:
        handle.write("\nfrom appliance import jobs  # noqa\n")
    found = layers.violations(tmp_path)
    assert any("appliance.data.clean imports appliance.export.gate (a stage importing another stage" in v
               for v in found), found
    assert any("appliance.run imports appliance.jobs (core importing orchestration)" in v for v in found), found
    assert len({v.split(":")[0] for v in found}) == 2  # nothing else


def test_jobs_and_converters_start_without_the_libraries_they_never_use(tmp_path: Path) -> None:
    """scikit-learn and SciPy never load in a job; bitsandbytes and torchao only where 4-bit or Unsloth can run
    (this machine has no NVIDIA driver). A converter script run through `python -m appliance.unused` sees its own
    folder first on the path and its own arguments, and finds the never-used libraries not installed."""
    from appliance import unused

    if shutil.which("nvidia-smi") is None:
        assert set(unused.unused("export", {})) == {"sklearn", "scipy", "bitsandbytes", "torchao"}
        assert set(unused.unused("train", {"backend": "unsloth"})) == {"sklearn", "scipy"}
    (tmp_path / "sibling.py").write_text("NAME = 'sibling'\n")
    (tmp_path / "script.py").write_text(
        "import importlib.util, json, sys\nimport sibling\n"
        "print(json.dumps([sys.argv, sibling.NAME, importlib.util.find_spec('sklearn') is None, __name__]))\n")
    out = subprocess.run([sys.executable, "-m", "appliance.unused", str(tmp_path / "script.py"), "--x", "1"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert json.loads(out) == [[str(tmp_path / "script.py"), "--x", "1"], "sibling", True, "__main__"]
    worker = subprocess.run([sys.executable, "-c", "import sys\nfrom appliance import unused\n"
                             "unused.keep_out(unused.NEVER_USED)\nimport transformers.generation.candidate_generator\n"
                             "print('sklearn' in sys.modules and sys.modules['sklearn'] is not None)"],
                            capture_output=True, text=True, check=True).stdout
    assert worker.strip() == "False"  # transformers takes its path without it
