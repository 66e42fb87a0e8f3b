"""Shared fixtures: the real default model, throwaway stores, a tiny random model, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.data.sample import shipped_path
from appliance.records import ExportResult
from appliance.run import Run
from appliance.store import Store

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "smollm2-135m-instruct"


def run_cli(*args: str, store: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m appliance ARGS` as a user would, in its own process."""
    full_env = dict(os.environ)
    if store is not None:
        full_env["APPLIANCE_HOME"] = str(store)
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def default_store() -> Store:
    """The project's store with the embedded default imported (install.sh does that; if a test
    run starts without it, it is imported here, through the same command)."""
    store = Store.open()
    if not store.has_model(DEFAULT_MODEL):
        result = run_cli("models", "import", "default")
        assert result.returncode == 0, result.stderr
    return store


def borrow_default(store: Store, default_store: Store) -> None:
    """A scratch store borrows the default model and the project store's cache of measurements (links: the
    model is read, never written; a cached file is written whole or not at all), so that the session's data jobs
    measure the PII detectors once, not once per store."""
    os.symlink(default_store.model_dir(DEFAULT_MODEL), store.model_dir(DEFAULT_MODEL))
    default_store.cache_dir.mkdir(exist_ok=True)
    os.symlink(default_store.cache_dir, store.cache_dir)


@pytest.fixture(scope="session")
def default_model_dir(default_store: Store) -> Path:
    return default_store.model_dir(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, default_store: Store) -> tuple[Store, Path]:
    """A scratch store borrowing the default model, with one run of prepared sample data."""
    store = Store.open(tmp_path_factory.mktemp("train-store"))
    borrow_default(store, default_store)
    result = run_cli("data", "prepare", str(shipped_path()), "--task", "classification", "--label-field",
                     "category", "--no-near-dup", "--pii-entities", "", "--json", store=store.root)
    assert result.returncode == 0, result.stderr
    return store, store.runs_dir / json.loads(result.stdout)["run"]


TINY_MODEL = "tiny-llama"


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
                  prepared: tuple[Store, Path]) -> tuple[Store, Path]:
    """A scratch store with the tiny random-weight Llama imported (through the CLI, as a folder is imported), and
    the prepared sample's run to clone data from: for the tests of the job machinery (faults, several processes),
    where the model's size costs only time. Their settings name the model: `base_model=TINY_MODEL`."""
    store = Store.open(tmp_path_factory.mktemp("tiny-store"))
    result = run_cli("models", "import", str(tiny_model_dir), "--name", TINY_MODEL, "--json", store=store.root)
    assert result.returncode == 0, result.stderr
    return store, prepared[1]


TRAIN_SETTINGS = {"max_steps": 8, "batch_size": 4, "max_seq_len": 192, "learning_rate": 5e-4, "eval_every": 8,
                  "save_every": 2, "keep_checkpoints": 2, "rank": 8, "alpha": 16, "backend": "hf",
                  "task_eval_items": 8}


@pytest.fixture(scope="session")
def trained(quickstarted: Quickstarted) -> tuple[Store, Path]:
    """The quickstart's run: the sample fine-tuned 8 steps with TRAIN_SETTINGS (it learns to answer with a label),
    evaluated at its end (evaluations at intervals: the Unsloth run of test_train). Tests that write into a run use
    `linked_copy` of it."""
    return quickstarted.store, quickstarted.run_dir


def linked_copy(run_dir: Path, name: str) -> Path:
    """A copy of a run beside it, for a test that runs a stage on it: the weights are hard links (read only,
    never written in place), everything a job may rewrite is copied."""
    copy = run_dir.parent / name

    def link_weights(source: str, target: str) -> object:
        return os.link(source, target) if source.endswith((".gguf", ".safetensors")) else shutil.copy2(source, target)

    shutil.copytree(run_dir, copy, copy_function=link_weights)
    return copy


@pytest.fixture(scope="session")
def exported(quickstarted: Quickstarted) -> tuple[Store, Path, ExportResult]:
    """The quickstart's run: the default model trained 8 steps on the sample and exported to F16, Q8_0 and
    Q4_K_M through the verification gate (one end-to-end run serves both)."""
    result = Run.at(quickstarted.run_dir).result("export")
    assert isinstance(result, ExportResult) and not result.rejected, result
    return quickstarted.store, quickstarted.run_dir, result


EXPORT_PPL_TOKENS = 256  # what the session's export scored; an export with the same settings reuses its files
QUICKSTART_ITEMS = 8  # the test rows the quickstart evaluates


@dataclass
class Quickstarted:
    """`appliance quickstart` run once for the session, watched by the egress witness (tests/witness)."""

    store: Store
    run_dir: Path
    summary: dict[str, Any]
    stdout: str
    stderr: str
    witness: Path
    runs: list[str]  # the store's runs right after the quickstart (later tests add their own)


@pytest.fixture(scope="session")
def quickstarted(tmp_path_factory: pytest.TempPathFactory, default_store: Store) -> Quickstarted:
    """The whole product once, end to end, with a small step budget (the tests' recipe: TRAIN_SETTINGS): the
    quickstart test checks it; its run is the session's trained and exported model, and the evaluation, PII and
    data tests check what its stages wrote instead of running them again."""
    from appliance.embedder import ensure_onnx

    store = Store.open(tmp_path_factory.mktemp("quickstart-store"))
    borrow_default(store, default_store)
    encoders = ensure_onnx(default_store.root).parent  # exported once for the session, not once per store
    os.symlink(encoders, store.root / encoders.name)
    witness = store.root / "witness.jsonl"
    recipe = store.root / "recipe.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in TRAIN_SETTINGS.items()), encoding="utf-8")
    result = run_cli("quickstart", "--recipe", str(recipe), "--ppl-tokens", str(EXPORT_PPL_TOKENS), "--max-items",
                     str(QUICKSTART_ITEMS), "--json", store=store.root, env={"APPLIANCE_WITNESS": str(witness),
                                                            "PYTHONPATH": str(REPO / "tests" / "witness")})
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    return Quickstarted(store, store.runs_dir / summary["run"], summary, result.stdout, result.stderr, witness,
                        sorted(d.name for d in store.runs_dir.iterdir()))


def losses(run_dir: Path, offset: int = 0) -> dict[int, float]:
    """The training loss at each step in a run's events (from byte `offset`: one job's share)."""
    from appliance import events as ev

    return {e.step: e.loss for e in ev.read_all(run_dir / ev.EVENTS_FILE, offset)
            if isinstance(e, ev.Progress) and e.phase == "training" and e.loss is not None}


def step_losses(run_dir: Path) -> dict[int, float]:
    """The training loss of every step so far, from the trainer state of the run's latest checkpoint (the
    events carry only some steps when steps are fast: progress is throttled to a few a second)."""
    from appliance.train import checkpoint

    latest = checkpoint.latest(run_dir)
    assert latest is not None, f"{run_dir} has no checkpoint"
    return dict(checkpoint.load_state(latest).losses)


def clone_run(store: Store, source: Path, name: str) -> Path:
    """A new run in `store` with the prepared data of `source`."""
    target = store.runs_dir / name
    shutil.copytree(source / "data", target / "data")
    return target


@pytest.fixture
def scratch_store(tmp_path: Path, default_store: Store) -> Store:
    """An empty store that borrows the default model (a link, not a copy), for jobs that write runs."""
    store = Store.open(tmp_path / "scratch-store")
    borrow_default(store, default_store)
    return store


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A 2-layer random-weight Llama in Hugging Face layout, with the default's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(default_model_dir / name, folder / name)
    return folder


def pytest_configure(config: pytest.Config) -> None:
    # The whole test session runs under the egress guard, as the CLI and every job do.
    from appliance import offline

    offline.activate()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from appliance.hardware import nvidia_gpus

    if nvidia_gpus():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # The job hosts this session started end with it rather than idling on (appliance.jobhost).
    from appliance import jobhost

    jobhost.stop_idle()
