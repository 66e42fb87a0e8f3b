"""`.ci/run` fails when a test fails and when no test runs (pytest's exit code 5)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import REPO


def _ci(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(REPO / ".ci" / "run"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=900, check=False)


@pytest.mark.slow
def test_ci_fails_on_a_failing_test_and_on_no_tests(tmp_path: Path) -> None:
    failing = tmp_path / "test_failing.py"
    failing.write_text("def test_fails():\n    assert 1 == 2\n")
    result = _ci(str(failing))
    assert result.returncode != 0, result.stdout[-2000:]
    assert "1 failed" in result.stdout

    passing = tmp_path / "test_passing.py"
    passing.write_text("def test_passes():\n    assert True\n")
    assert _ci(str(passing)).returncode == 0

    none = _ci(str(passing), "-k", "no_such_test_anywhere")
    assert none.returncode != 0
    assert "no tests ran" in none.stdout + none.stderr
