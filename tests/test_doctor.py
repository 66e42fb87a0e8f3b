"""`appliance doctor` is green on this installation and fails, with a fix, on a broken one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import run_cli

from appliance import toolchain
from appliance.store import Store


def test_doctor_is_green(default_store: Store) -> None:
    result = run_cli("doctor", "--json", store=default_store.root)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is True
    assert checks["toolchain match"]["status"] == "ok"
    assert checks["egress guard"]["status"] == "ok"
    assert checks["entity models"]["status"] == "ok" and "en_core_web_sm 3.8.0" in checks["entity models"]["detail"]
    assert "fr_core_news_sm 3.8.0" in checks["entity models"]["detail"]
    facts = report["facts"]
    assert facts["runtime"]["llama_cpp_python"] == facts["converter"]["llama_cpp_python"]
    assert facts["runtime"]["ggml"] == facts["converter"]["ggml"]
    assert "smollm2-135m-instruct" in facts["models"]
    text = run_cli("doctor", store=default_store.root).stdout
    assert "All good" in text


def test_doctor_catches_a_mismatched_converter(tmp_path: Path, default_store: Store) -> None:
    copy = tmp_path / "llama.cpp"
    shutil.copytree(toolchain.toolchain_dir(), copy)
    manifest = json.loads((copy / "toolchain.json").read_text())
    manifest["ggml"] = "0.0.1"
    (copy / "toolchain.json").write_text(json.dumps(manifest))
    result = run_cli("doctor", "--json", store=default_store.root, env={"APPLIANCE_TOOLCHAIN": str(copy)})
    assert result.returncode == 1
    match = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "toolchain match")
    assert match["status"] == "fail" and "install.sh" in match["hint"]


def test_doctor_catches_a_missing_converter(tmp_path: Path, default_store: Store) -> None:
    result = run_cli("doctor", store=default_store.root, env={"APPLIANCE_TOOLCHAIN": str(tmp_path / "gone")})
    assert result.returncode == 1
    assert "install.sh" in result.stdout and "FAIL" in result.stdout
