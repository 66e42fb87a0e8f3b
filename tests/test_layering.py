"""The TUI and the light core modules never pull in the heavy ML stack; the core never pulls in
Textual. Checked in fresh interpreters, since this test process has imported everything."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "unsloth", "llama_cpp", "peft", "trl", "onnxruntime", "datasets")


def _modules_after_import(*modules: str) -> set[str]:
    code = (f"import json, sys\nfor m in {list(modules)!r}: __import__(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


LIGHT = ["tui", "tui.app", "tui.screens.home", "tui.screens.train", "tui.screens.chat", "tui.screens.new_run",
         "appliance.runs", "appliance.serve.model", "appliance.serve.server", "appliance.serve.chat",
         "appliance.config", "appliance.store", "appliance.events", "appliance.jobs", "appliance.cli",
         "appliance.doctor", "appliance.toolchain", "appliance.hardware", "appliance.data.prepare",
         "appliance.export.run", "appliance.manifest"]


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_do_not_import_the_ml_stack(module: str) -> None:
    loaded = _modules_after_import(module)
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}


@pytest.mark.parametrize("module", ["appliance.cli", "appliance.importer", "appliance.worker",
                                    "appliance.jobs", "appliance.doctor", "appliance.runs", "appliance.serve.server"])
def test_core_does_not_import_textual(module: str) -> None:
    assert not {m for m in _modules_after_import(module) if m.split(".")[0] == "textual"}


def test_help_is_fast_and_light() -> None:
    result = subprocess.run([sys.executable, "-m", "appliance", "--help"], capture_output=True,
                            text=True, check=True)
    assert "doctor" in result.stdout and "models" in result.stdout
