"""The signed audit manifest: every recorded file re-hashed, the signature checked, and each kind of
tampering named precisely (changed, missing, unrecorded, edited manifest, foreign key)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from conftest import run_cli

from appliance import manifest
from appliance.config import TrainConfig
from appliance.records import Counts, DataReport, InputFile, PiiReport
from appliance.run import Run
from appliance.store import Store


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Store, Path, Path]:
    """A store with one run holding data, an adapter and a GGUF, and its manifest written."""
    store = Store.open(tmp_path / "store")
    source = tmp_path / "tickets.csv"
    source.write_text("text,category\nprinter jams,hardware\n", encoding="utf-8")
    run = store.new_run("run-1")
    run_dir = run.path
    run.record("train", TrainConfig(max_steps=8, store=str(store.root)))
    run.data_dir.mkdir()
    run.split_path("train").write_text('{"messages": []}\n', encoding="utf-8")
    run.write_data_report(DataReport(counts=Counts(), pii=PiiReport(mode="redact"), inputs=[
        InputFile(path=str(source), sha256=_sha(source), bytes=source.stat().st_size)]))
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"\x01" * 4096)
    (run_dir / "gguf").mkdir()
    (run_dir / "gguf" / "m-Q8_0.gguf").write_bytes(b"GGUF" + b"\x02" * 8192)
    (run_dir / "gguf" / ".m-Q4_0.gguf.partial").write_bytes(b"half")  # temporary files are not artifacts
    manifest.write(run)
    return store, run_dir, source


def _sha(path: Path) -> str:
    from appliance.fsutil import sha256_file

    return sha256_file(path)


def test_manifest_lists_inputs_and_artifacts_and_verifies(signed: tuple[Store, Path, Path]) -> None:
    store, run_dir, source = signed
    data = json.loads(Run.at(run_dir).manifest_path.read_text())
    assert set(data["files"]) == {"run.yaml", "data/train.jsonl", f"data/{Run.at(run_dir).data_report_path.name}",
                                  "adapter/adapter_model.safetensors", "gguf/m-Q8_0.gguf"}
    assert data["files"]["gguf/m-Q8_0.gguf"] == {"sha256": _sha(run_dir / "gguf" / "m-Q8_0.gguf"), "bytes": 8196}
    assert data["inputs"]["data"][0]["path"] == str(source)
    assert {"appliance", "python", "torch", "llama_cpp_python", "ggml"} <= set(data["versions"])
    assert data["signature"]["algorithm"] == "ed25519"
    report = manifest.verify(Run(store, run_dir))
    assert report.ok and report.signature == "valid" and report.checked == 6
    assert not (report.changed or report.missing or report.unrecorded or report.unavailable)


def test_signing_key_is_owner_only(signed: tuple[Store, Path, Path]) -> None:
    store, _run_dir, _source = signed
    key = manifest.key_dir(store) / manifest.KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_a_changed_byte_is_named(signed: tuple[Store, Path, Path]) -> None:
    store, run_dir, _source = signed
    gguf = run_dir / "gguf" / "m-Q8_0.gguf"
    raw = bytearray(gguf.read_bytes())
    raw[100] ^= 0xFF  # same size, one bit pattern different
    gguf.write_bytes(bytes(raw))
    report = manifest.verify(Run(store, run_dir))
    assert not report.ok and report.signature == "valid"
    assert report.changed == ["run-1/gguf/m-Q8_0.gguf"]
    result = run_cli("verify", "run-1", store=store.root)
    assert result.returncode == 1
    assert "changed: run-1/gguf/m-Q8_0.gguf" in result.stdout and "Verification failed" in result.stdout


def test_missing_and_unrecorded_files_are_named(signed: tuple[Store, Path, Path]) -> None:
    store, run_dir, _source = signed
    (run_dir / "adapter" / "adapter_model.safetensors").unlink()
    (run_dir / "gguf" / "extra-Q2_K.gguf").write_bytes(b"GGUF")
    report = manifest.verify(Run(store, run_dir))
    assert report.missing == ["run-1/adapter/adapter_model.safetensors"]
    assert report.unrecorded == ["run-1/gguf/extra-Q2_K.gguf"]
    assert not report.ok


def test_an_edited_manifest_breaks_the_signature(signed: tuple[Store, Path, Path]) -> None:
    store, run_dir, _source = signed
    path = Run.at(run_dir).manifest_path
    data = json.loads(path.read_text())
    data["files"]["gguf/m-Q8_0.gguf"]["sha256"] = "0" * 64  # someone hides a swapped file
    path.write_text(json.dumps(data))
    report = manifest.verify(Run(store, run_dir))
    assert report.signature.startswith("invalid") and not report.ok


def test_a_manifest_signed_by_another_key_is_not_trusted(signed: tuple[Store, Path, Path], tmp_path: Path) -> None:
    store, run_dir, _source = signed
    other = Store.open(tmp_path / "other-store")
    manifest.write(Run(other, run_dir))  # valid signature, but not this store's key
    report = manifest.verify(Run(store, run_dir))
    assert report.signature.startswith("foreign key") and not report.ok


def test_an_input_outside_the_store_is_checked_while_it_exists(signed: tuple[Store, Path, Path]) -> None:
    store, run_dir, source = signed
    source.write_text("text,category\nprinter jams,network\n", encoding="utf-8")
    assert manifest.verify(Run(store, run_dir)).changed == [str(source)]
    source.unlink()
    report = manifest.verify(Run(store, run_dir))
    assert report.unavailable == [str(source)] and report.ok  # gone is not tampered: reported, not failed


def test_a_key_readable_by_others_is_refused(signed: tuple[Store, Path, Path]) -> None:
    store, run_dir, _source = signed
    key = manifest.key_dir(store) / manifest.KEY_FILE
    os.chmod(key, 0o644)
    with pytest.raises(manifest.ManifestError, match="can be read by other users") as caught:
        manifest.write(Run(store, run_dir))
    assert f"chmod 600 {key}" in caught.value.hint


def test_verify_without_a_manifest_says_how_to_get_one(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    (store.runs_dir / "run-2").mkdir(parents=True)
    result = run_cli("verify", "run-2", store=store.root)
    assert result.returncode == 1
    manifest_name = Run.at(store.runs_dir / "run-2").manifest_path.name
    assert f"has no {manifest_name}" in result.stderr and "appliance export --run run-2" in result.stderr
