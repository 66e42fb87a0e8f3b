"""Both training backends import on this machine under the egress guard, and nothing in them
tries to reach the network while doing so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import sys
from pathlib import Path
from appliance import offline
offline.activate(Path(sys.argv[1]))
{imports}
print("imported")
"""


@pytest.mark.parametrize(
    "imports",
    [
        "import transformers, peft, trl, accelerate, datasets",
        "import unsloth\nfrom unsloth import FastLanguageModel",
    ],
    ids=["hf", "unsloth"],
)
def test_backend_imports_offline(imports: str, tmp_path: Path) -> None:
    log = tmp_path / "egress.jsonl"
    result = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports), str(log)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported" in result.stdout
    assert not log.exists(), log.read_text()  # no connection was even attempted
