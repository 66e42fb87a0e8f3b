"""Fine-tuning the real default model on the shipped sample, on the CPU: loss falls, the adapter
loads with peft, events are complete; a SIGTERM stops at a step boundary and saves. (A run killed with
SIGKILL resumes exactly where its checkpoint was: test_faults.)"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import DEFAULT_MODEL, TRAIN_SETTINGS, clone_run, losses, run_cli

from appliance import events as ev
from appliance import jobs
from appliance.config import TrainConfig
from appliance.run import Run
from appliance.store import Store

# Unsloth's CPU fallback (float32): 6 steps of 2 x 128 tokens, evaluated at the end (a validation pass over the
# prepared run's 48 rows costs as much as 12 steps); the session's run: TRAIN_SETTINGS, 8 steps evaluated at the end
SETTINGS: dict[str, Any] = {**{k: v for k, v in TRAIN_SETTINGS.items() if k != "backend"}, "max_steps": 6,
                            "eval_every": 6, "batch_size": 2, "max_seq_len": 128}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hf", "unsloth"])
def test_lora_training_end_to_end(backend: str, request: pytest.FixtureRequest) -> None:
    if backend == "hf":  # the session's trained run (conftest: the quickstart's) is this very training
        store, run_dir = request.getfixturevalue("trained")
        trained = Run.at(run_dir).result("train")
        assert trained is not None
        done = trained.model_dump(mode="json")
    else:
        store, source = request.getfixturevalue("prepared")
        run_dir = clone_run(store, source, f"e2e-{backend}")
        recipe = run_dir.parent / "recipe.yaml"
        # the label probe has its own test, on the session's trained run: this one measures the loss only
        recipe.write_text("\n".join(f"{k}: {v}" for k, v in {**SETTINGS, "task_eval_items": 0}.items()) + "\n")
        result = run_cli("train", "--run", run_dir.name, "--recipe", str(recipe), "--backend", backend, "--json",
                         store=store.root)
        assert result.returncode == 0, result.stderr
        done = json.loads(result.stdout)
    steps = 8 if backend == "hf" else SETTINGS["max_steps"]
    assert done["steps"] == steps and done["backend"] == backend and done["method"] == "lora"
    trajectory = losses(run_dir)
    assert sorted(trajectory) == list(range(1, steps + 1))
    first, last = sum(trajectory[s] for s in (1, 2, 3)) / 3, sum(trajectory[s] for s in range(steps - 2, steps + 1)) / 3
    assert last < first * 0.7, trajectory  # it learned
    events = ev.read_all(run_dir / ev.EVENTS_FILE)
    progress = [e for e in events if isinstance(e, ev.Progress) and e.phase == "training"]
    assert all(p.lr is not None and p.tokens_per_s and p.eta_s is not None and p.mem_mb for p in progress)
    evals = [e for e in events if isinstance(e, ev.Metric) and e.name == "eval_loss"]
    assert [e.step for e in evals] == [steps]
    checkpoints = [e for e in events if isinstance(e, ev.Artifact) and e.kind == "checkpoint"]
    assert len(checkpoints) == steps // 2  # one every 2 steps
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step-{steps - 2}", f"step-{steps}"]
    adapter = [e for e in events if isinstance(e, ev.Artifact) and e.kind == "adapter"]
    assert adapter and adapter[0].sha256 == done["sha256"]
    assert yaml_train(run_dir)["max_steps"] == steps

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(store.model_dir(DEFAULT_MODEL), dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 19556, 2]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, done["adapter"])
        after = tuned(ids).logits
    assert not torch.allclose(before, after, atol=1e-3)  # the adapter changes the model


def yaml_train(run_dir: Path) -> dict[str, Any]:
    import yaml

    data: dict[str, Any] = yaml.safe_load((run_dir / "run.yaml").read_text())["train"]
    return data


@pytest.mark.slow
def test_sigterm_stops_at_a_step_and_saves(prepared: tuple[Store, Path]) -> None:
    store, source = prepared
    run_dir = clone_run(store, source, "stopped")
    cfg = TrainConfig(store=str(store.root), **{**SETTINGS, "max_steps": 40, "save_every": 100, "eval_every": 1000,
                                                "task_eval_items": 0})
    job = jobs.start("train", run_dir, cfg)
    for event in job.follow():
        if isinstance(event, ev.Progress) and event.phase == "training" and event.step >= 2:
            job.process.send_signal(signal.SIGTERM)
            break
    with pytest.raises(jobs.Cancelled) as excinfo:
        job.wait()
    assert job.process.returncode == 130
    assert "checkpoint is saved" in excinfo.value.message and f"--resume {run_dir.name}" in excinfo.value.hint
    saved = sorted((run_dir / "checkpoints").iterdir())
    assert len(saved) == 1 and int(saved[0].name.split("-")[1]) >= 2
    assert not (run_dir / "adapter").exists()
