"""`appliance quickstart` end to end on the real default model and the shipped sample, with a tiny
step budget: every stage ran in one new run, and the summary's JSON agrees with what the stages
wrote. It runs watched by an independent witness (tests/witness: audit hooks in every Python process
it starts): the egress guard refused nothing because nothing tried, no connection or name lookup left
loopback, and no pickle was opened."""

from __future__ import annotations

import ipaddress
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import QUICKSTART_ITEMS, Quickstarted, run_cli

from appliance.run import Run


@pytest.mark.slow
def test_quickstart_with_a_tiny_budget(quickstarted: Quickstarted) -> None:
    store, witness, summary = quickstarted.store, quickstarted.witness, quickstarted.summary
    assert not store.egress_log.exists() or store.egress_log.read_text() == ""  # zero attempts refused
    seen = [json.loads(line) for line in witness.read_text().splitlines()]
    assert [e for e in seen if e["event"] != "start" and not _local(e)] == []
    assert len({e["pid"] for e in _processes(witness)}) >= 5  # the CLI and its four stage jobs were all watched
    run_dir = quickstarted.run_dir
    assert quickstarted.runs == [run_dir.name]  # one new run

    counts = summary["data"]["counts"]
    assert counts["rows_read"] == 480 and counts["train"] > 300
    assert sum(summary["data"]["pii"].values()) > 50  # the sample's planted PII was found (and redacted)
    assert summary["train"]["steps"] == 8 and summary["train"]["method"] == "lora"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    files = {f["quant"]: f for f in summary["export"]["files"]}
    rejected = summary["export"]["rejected"]
    assert {"F16", "Q8_0", "Q4_K_M"} <= set(files) | set(rejected) and files["F16"]["passed"]
    for quant, entry in files.items():  # every file passed the gate and is on disk, or was set aside
        assert entry["passed"] == (quant not in rejected)
        assert (run_dir / "gguf" / entry["file"]).is_file() == entry["passed"]
    assert bool(rejected) == (run_dir / "gguf-rejected").is_dir()  # a short training may leave a quant that runs on
    assert (run_dir / "gguf" / "Modelfile").is_file() and (run_dir / "manifest.json").is_file()
    verified = {q for q, f in files.items() if f["passed"]}

    evaluation = summary["eval"]
    targets = {t["target"]: t for t in evaluation["targets"]}
    assert set(targets) == {"base", "fewshot", "tuned"} | {f"gguf:{q}" for q in verified}
    assert evaluation["n"] == QUICKSTART_ITEMS and evaluation["primary"] == "accuracy"
    on_disk = Run.at(run_dir).comparison()
    assert on_disk is not None
    assert {t.target: t.score.point for t in on_disk.targets} == \
        {name: t["score"]["point"] for name, t in targets.items()}
    assert summary["tuned_ahead_of_base"] == (targets["tuned"]["score"]["point"] > targets["base"]["score"]["point"])
    assert any("tuned" in sentence and "base" in sentence for sentence in evaluation["comparisons"])
    assert summary["next"][0] == f"appliance chat {run_dir.name}"
    assert set(summary["seconds"]) == {"data", "train", "export", "eval", "total"}


def _local(entry: dict[str, Any]) -> bool:
    """A witnessed event that stays on this machine: loopback or a Unix socket, a local name; no pickle."""
    if entry["event"] == "open":
        return _message_pack_of_an_entity_model(entry["path"])
    if entry["event"].startswith("socket.get"):
        host = entry["host"].strip("'b\"")
        return host in ("localhost", socket.gethostname(), "None", "") or _loopback(host)
    if entry["family"] == socket.AF_UNIX:
        return True
    address = entry["address"].strip("()").split(",")[0].strip("'b\"")
    return _loopback(address)


def _message_pack_of_an_entity_model(path: str) -> bool:
    """spaCy's lookup tables are named .bin but hold MessagePack (srsly): a file of a verified entity model that
    parses as MessagePack to its last byte is no pickle (a pickle's bytes leave data over, or do not parse)."""
    import srsly
    from srsly.msgpack.exceptions import UnpackException

    from appliance.entities import MODELS, model_dir

    if not any(Path(path).is_relative_to(model_dir(language)) for language in MODELS):
        return False
    try:
        srsly.msgpack_loads(Path(path).read_bytes())
    except (ValueError, UnpackException, OSError):  # treat it as the pickle its name says
        return False
    return True


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _processes(witness: Path) -> list[dict[str, Any]]:
    """One entry per watched process (each writes a `start` line)."""
    return [e for e in (json.loads(line) for line in witness.read_text().splitlines()) if e["event"] == "start"]


def test_a_bad_recipe_is_refused_before_anything_runs(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("batch_size: 2\nrank: 0\n", encoding="utf-8")
    store = tmp_path / "store"
    result = run_cli("quickstart", "--recipe", str(recipe), store=store)
    assert result.returncode == 1 and f"{recipe}:2: rank: Input should be greater than or equal to 1" in result.stderr
    assert not (store / "runs").exists() or not any((store / "runs").iterdir())  # no run, no import
    assert not (store / "jobs").exists() or not any((store / "jobs").iterdir())
