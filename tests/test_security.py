"""Security: names from users and from files cannot lead out of the store, only safetensors and GGUF
are ever loaded (a planted pickle is refused, never unpickled), remote code stays off, and secrets are
owner-only and never written to a log."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, run_cli

from appliance import jobs, manifest
from appliance.config import ExportConfig
from appliance.errors import JobFailed, StoreError
from appliance.fsutil import inside
from appliance.records import ExportResult
from appliance.run import Run
from appliance.serve.model import resolve
from appliance.store import Store

ESCAPES = ["..", "../..", "../../etc", "/etc", "runs/../../x", ".hidden", "a/b", "", "..\\..\\x"]


@pytest.mark.parametrize("name", ESCAPES)
def test_run_and_model_names_cannot_leave_the_store(store_dir: Path, name: str) -> None:
    store = Store.open(store_dir)
    with pytest.raises(StoreError):
        store.run(name)
    with pytest.raises(StoreError):
        store.new_run(name)
    with pytest.raises(StoreError):
        store.model_dir(name)
    assert not store.has_model(name)


def test_a_link_out_of_the_store_is_refused(store_dir: Path, tmp_path: Path) -> None:
    store = Store.open(store_dir)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (store.runs_dir / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StoreError, match=r"leads outside .* through a symbolic link"):
        store.run("linked")
    with pytest.raises(StoreError, match="not a plain name"):
        inside(store.runs_dir, "/etc/passwd", "file")


def test_the_cli_names_the_bad_name(store_dir: Path) -> None:
    for args in (["train", "--run", "../../etc"], ["export", "--run", "/etc"], ["models", "show", "../base"],
                 ["verify", "../.."]):
        result = run_cli(*args, store=store_dir)
        assert result.returncode == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr and "not a" in result.stderr, (args, result.stderr)


def test_names_written_in_records_cannot_lead_out_either(exported: tuple[Store, Path, ExportResult],
                                                         tmp_path: Path) -> None:
    store, source, _result = exported
    run_dir = store.runs_dir / "tampered"
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("merged", "checkpoints", "*.gguf"))
    secret = tmp_path / "secret.gguf"
    secret.write_bytes(b"GGUF not yours")
    run = Run.at(run_dir)
    record = run.verification()
    assert record is not None
    for entry in record.files:
        entry.file = os.path.relpath(secret, run.gguf_dir)
    run.write_verification(record)
    with pytest.raises(StoreError, match=r"exported file .* not a plain name"):
        resolve(store, "tampered", "Q8_0")

    manifest_path = run_dir / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["files"] = {"../../../../../../etc/passwd": {"bytes": 1, "sha256": "0" * 64}}
    manifest_path.write_text(json.dumps(data))
    report = manifest.verify(Run(store, run_dir))
    assert not report.ok and report.changed == ["tampered/../../../../../../etc/passwd (leads outside the run)"]


class _Planted:
    """A pickle that, if it were ever loaded, would leave a mark on disk."""

    def __init__(self, mark: Path) -> None:
        self.mark = mark

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.mark, "unpickled"))


def test_a_planted_pickle_is_refused_never_loaded(trained: tuple[Store, Path], tmp_path: Path) -> None:
    store, source = trained
    run_dir = store.runs_dir / "planted-pickle"
    shutil.copytree(source / "data", run_dir / "data")
    shutil.copytree(source / "adapter", run_dir / "adapter")
    (run_dir / "adapter" / "adapter_model.safetensors").unlink()
    mark = tmp_path / "mark"
    with open(run_dir / "adapter" / "adapter_model.bin", "wb") as handle:
        pickle.dump(_Planted(mark), handle)
    with pytest.raises(JobFailed, match=r"no adapter_model\.safetensors"):
        jobs.run("export", run_dir, ExportConfig(store=str(store.root)))
    assert not mark.exists()


def test_the_code_loads_no_pickle_and_runs_no_remote_code() -> None:
    """What the tests above check at run time, checked in every line of the source."""
    forbidden = re.compile(r"torch\.load\(|pickle\.loads?\(|joblib|allow_pickle\s*=\s*True|"
                           r"trust_remote_code\s*=\s*True|weights_only\s*=\s*False|use_safetensors\s*=\s*False")
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for folder in ("appliance", "tui") for path in sorted((REPO / folder).rglob("*.py"))
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if forbidden.search(line)]
    assert found == []


def test_secrets_are_owner_only_and_never_logged(exported: tuple[Store, Path, ExportResult]) -> None:
    store, run_dir, _result = exported
    key_files = [p for p in manifest.key_dir(store).iterdir() if p.is_file()]
    private = [p for p in key_files if p.name != manifest.PUBLIC_FILE]
    assert private and all(p.stat().st_mode & 0o077 == 0 for p in private)
    assert manifest.key_dir(store).stat().st_mode & 0o077 == 0
    secrets = [p.read_bytes().strip() for p in private]
    logs = [run_dir / "events.jsonl", run_dir / jobs.LOG_FILE, run_dir / "manifest.json", run_dir / "run.yaml",
            store.root / "audit" / "egress.jsonl"]
    for log in (p for p in logs if p.is_file()):
        text = log.read_bytes()
        assert not any(secret in text for secret in secrets), log


def test_a_key_file_others_can_read_is_refused(store_dir: Path, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("s3cret-key-0123456789\n")
    key.chmod(0o644)
    result = run_cli("serve", "whatever", "--api-key-file", str(key), store=store_dir)
    assert result.returncode == 1 and "can be read by other users" in result.stderr and "chmod 600" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout
