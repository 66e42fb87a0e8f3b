"""Training on several processes through accelerate: the same code path as on GPUs, here with two CPU
processes over gloo on loopback. Two processes with the same global batch follow the loss trajectory
of one, replicated (DDP) or sharded (FSDP2), on one node or two; a killed two-process run leaves no
process behind, and its checkpoint resumes on another number of processes and another layout."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY_MODEL, clone_run, losses, step_losses

from appliance import events as ev
from appliance import jobs, offline
from appliance.config import TrainConfig
from appliance.errors import JobFailed
from appliance.store import Store
from appliance.train import checkpoint, distributed
from appliance.train.distributed import Group

# fp32 and no dropout: the only difference between the layouts is the order of floating-point sums. The tiny
# random-weight Llama: what is under test is the processes, not the model (a bigger one only costs time).
SMALL = {"max_steps": 4, "batch_size": 2, "max_seq_len": 128, "learning_rate": 5e-3, "rank": 8, "alpha": 16,
         "dtype": "float32", "eval_every": 1000, "save_every": 2, "task_eval_items": 0, "backend": "hf",
         "base_model": TINY_MODEL}


def test_cluster_settings_are_checked_before_anything_starts() -> None:
    def refused(**settings: Any) -> str:
        with pytest.raises(ValueError) as excinfo:
            TrainConfig(store="/tmp/unused", **settings)
        return str(excinfo.value)

    assert "node_rank 2 is not among 2 node(s)" in refused(nodes=2, node_rank=2, main_address="10.0.0.5:29500")
    assert "needs main_address" in refused(nodes=2)
    assert "is not HOST:PORT" in refused(nodes=2, main_address="10.0.0.5")
    assert "unsloth backend trains on one device" in refused(processes=2, backend="unsloth")
    assert TrainConfig(store="/tmp/unused", processes=4, nodes=2, main_address="h:1").world_size == 8


def test_every_rank_takes_as_many_turns() -> None:
    assert Group(world=2, rank=0).share([0, 1, 2]) == [0, 2]
    assert Group(world=2, rank=1).share([0, 1, 2]) == [1, None]  # joins the collective with no rows of its own
    assert Group(world=3, rank=2).share([7]) == [None]
    assert Group().share([0, 1, 2]) == [0, 1, 2]


def test_the_accelerate_configuration_names_every_machine_and_process() -> None:
    cfg = TrainConfig(store="/tmp/unused", processes=4, nodes=2, node_rank=1, main_address="10.0.0.5:29511",
                      sharding="fsdp")
    config = distributed.accelerate_config(cfg, cuda=True, port=1, layer_classes=["LlamaDecoderLayer"])
    assert yaml.safe_load(distributed._yaml(config)) == config
    assert (config["num_processes"], config["num_machines"], config["machine_rank"]) == (8, 2, 1)
    assert (config["main_process_ip"], config["main_process_port"]) == ("10.0.0.5", 29511)
    assert config["distributed_type"] == "FSDP"
    assert config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    single = distributed.accelerate_config(TrainConfig(store="/tmp/unused", processes=2), cuda=False, port=29600,
                                           layer_classes=[])
    assert single["distributed_type"] == "MULTI_GPU" and "fsdp_config" not in single
    assert (single["main_process_ip"], single["main_process_port"]) == ("127.0.0.1", 29600)


def test_optimizer_state_keyed_by_name_comes_back_keyed_by_position() -> None:
    """What FSDP's gathered optimizer state (keyed by parameter name) becomes in a checkpoint, the state a
    single process keeps, checked against torch's own conversion on an unsharded model."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    keyed = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    assert set(keyed["state"]) == set(names) == {"0.bias", "1.weight", "1.bias"}
    positions = checkpoint.by_position(keyed, names)
    own = optimizer.state_dict()
    assert positions["state"].keys() == own["state"].keys()
    for index, value in own["state"].items():
        assert torch.equal(positions["state"][index]["exp_avg"], value["exp_avg"])
    assert [g["params"] for g in positions["param_groups"]] == [g["params"] for g in own["param_groups"]]
    assert checkpoint.by_name(positions, names)["state"].keys() == keyed["state"].keys()


def test_a_checkpoint_written_sharded_and_one_written_plainly_load_either_way(tmp_path: Path) -> None:
    """The checkpoint code of a sharded run (gather the weights, re-key the optimizer state by position) and of a
    plain one write the same files, and each loads into the other layout: here on an unsharded module, which
    torch's state-dict functions treat as they treat an FSDP one (the two-process runs above shard for real)."""
    import torch

    def trained_once(seed: int) -> tuple[Any, Any, Any]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        model[0].weight.requires_grad_(False)
        model.save_pretrained = lambda folder, safe_serialization, state_dict=None: _save(model, folder, state_dict)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
        return model, optimizer, scheduler

    def _save(model: Any, folder: str, state_dict: dict[str, Any] | None) -> None:
        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in (state_dict or model.state_dict()).items()},
                  str(Path(folder) / "model.safetensors"))

    model, optimizer, scheduler = trained_once(0)
    sharded = Group(sharding="fsdp", wrapped=distributed._loss_module(model))
    state = checkpoint.TrainerState(step=1)
    written = {"sharded": checkpoint.save(tmp_path / "a", 1, model, optimizer, scheduler, state, 1, sharded),
               "plain": checkpoint.save(tmp_path / "b", 1, model, optimizer, scheduler, state, 1, Group())}
    from safetensors.torch import load_file

    weights = {name: load_file(str(folder / "model" / "model.safetensors")) for name, folder in written.items()
               if folder is not None}
    assert weights["sharded"].keys() == weights["plain"].keys() == {"0.weight", "0.bias", "1.weight", "1.bias"}
    for name in ("sharded", "plain"):
        for into in (Group(), "sharded"):
            fresh, fresh_optimizer, fresh_scheduler = trained_once(1)  # other weights, other moments
            group = Group(sharding="fsdp", wrapped=distributed._loss_module(fresh)) if into == "sharded" else into
            assert not torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg_sq"],
                                   optimizer.state_dict()["state"][0]["exp_avg_sq"])
            checkpoint.load_optimizer(written[name] or tmp_path, fresh_optimizer, fresh_scheduler, group)
            for index, value in optimizer.state_dict()["state"].items():
                loaded = fresh_optimizer.state_dict()["state"][index]
                assert torch.equal(loaded["exp_avg_sq"], value["exp_avg_sq"]), (name, into)
                assert float(loaded["step"]) == float(value["step"])


def test_a_named_cluster_peer_is_the_only_address_let_through(tmp_path: Path) -> None:
    log = tmp_path / "egress.jsonl"
    was_active = offline.is_active()
    offline.activate(log)
    try:
        assert not offline._is_local(("10.1.2.3", 29500), 2) and not offline._local_name("node0.example")
        offline.allow_peer("10.1.2.3")
        assert offline._is_local(("10.1.2.3", 29500), 2) and offline._local_name("10.1.2.3")
        assert not offline._is_local(("10.1.2.4", 29500), 2)
    finally:
        offline._state["peers"].clear()
        if not was_active:
            offline.deactivate()
    entry = [line for line in log.read_text().splitlines() if "peer_allowed" in line]
    assert entry and "10.1.2.3" in entry[0]


def test_sharding_one_cpu_process_is_refused_with_the_way_that_works(tiny_prepared: tuple[Store, Path]) -> None:
    store, source = tiny_prepared
    run_dir = clone_run(store, source, "fsdp-on-one-cpu")
    with pytest.raises(JobFailed) as excinfo:
        jobs.run("train", run_dir, TrainConfig(store=str(store.root), sharding="fsdp", **SMALL))
    assert "shards nothing" in excinfo.value.message and "--processes 2" in excinfo.value.hint


def _train(store: Store, source: Path, name: str, **settings: Any) -> tuple[Path, dict[str, Any]]:
    run_dir = clone_run(store, source, name)
    done = jobs.run("train", run_dir, TrainConfig(store=str(store.root), **{**SMALL, **settings}))
    return run_dir, done.result


def _two_nodes(store: Store, source: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Two machines of one process each, played by two runs on this one over loopback: each node runs the
    same command with its own rank and keeps its own copy of the run."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = [clone_run(store, source, f"node-{rank}") for rank in (0, 1)]
    started = [jobs.start("train", run_dir, TrainConfig(store=str(store.root), nodes=2, node_rank=rank,
                                                        main_address=f"127.0.0.1:{port}", **SMALL),
                          env={"OMP_NUM_THREADS": "1"})  # two "machines" share these cores
               for rank, run_dir in enumerate(nodes)]
    return [(run_dir, job.wait().result) for run_dir, job in zip(nodes, started, strict=True)]


@pytest.fixture(scope="module")
def references(tiny_prepared: tuple[Store, Path]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """The same training, uninterrupted, with global batch 4 both ways: one process accumulating 2 micro-batches
    of 2 rows, and two processes of 2 rows each, on two nodes (the leading node's run is "two"; two processes on
    one node are the sharded and the stopped runs below)."""
    store, source = tiny_prepared
    nodes = _two_nodes(store, source)
    return {"one": _train(store, source, "one-process", grad_accum=2), "two": nodes[0], "node-1": nodes[1]}


@pytest.mark.slow
def test_two_processes_follow_the_loss_trajectory_of_one(
        references: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    (one_dir, one), (two_dir, two) = references["one"], references["two"]
    one_losses, two_losses = step_losses(one_dir), step_losses(two_dir)
    assert sorted(one_losses) == sorted(two_losses) == [1, 2, 3, 4]
    for step, loss in one_losses.items():
        assert two_losses[step] == pytest.approx(loss, rel=2e-3), (step, one_losses, two_losses)
    assert one_losses[4] < one_losses[1]  # it learns, the same way
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=2e-3)
    assert two["real_tokens"] == one["real_tokens"] and two["steps"] == 4
    logs = [e.message for e in ev.read_all(two_dir / ev.EVENTS_FILE) if isinstance(e, ev.Log)]
    assert any("training on 2 processes" in m and "gloo" in m for m in logs)
    assert (two_dir / "accelerate.yaml").is_file() and (two_dir / "adapter" / "adapter_model.safetensors").is_file()
    progress = [e for e in ev.read_all(two_dir / ev.EVENTS_FILE) if isinstance(e, ev.Progress)]
    steps = [e.step for e in progress if e.phase == "training"]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # one stream, not one per rank (throttled, in order)


def _processes_of(run_dir: Path) -> list[int]:
    """Live processes whose command line names the run (the worker, the launcher, the ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(run_dir).encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_two_nodes_meet_at_the_main_address(references: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    """The two nodes of the reference met, trained the same adapter, and each kept its own ranks' records."""
    nodes, results = zip(references["two"], references["node-1"], strict=True)
    assert [r["steps"] for r in results] == [4, 4]
    assert results[0]["sha256"] == results[1]["sha256"]  # the same adapter on both nodes
    assert (nodes[1] / "ranks" / "rank-1.jsonl").is_file() and not (nodes[1] / "ranks" / "rank-0.jsonl").exists()
    two = step_losses(nodes[0])
    for step, loss in losses(nodes[1]).items():  # each node's own stream shows its leading process's steps
        assert loss == pytest.approx(two[step], rel=2e-3)
    config = yaml.safe_load((nodes[1] / "accelerate.yaml").read_text())
    assert (config["num_machines"], config["machine_rank"], config["num_processes"]) == (2, 1, 2)


@pytest.mark.slow
def test_a_killed_sharded_run_leaves_nothing_running_and_resumes_anywhere(
        tiny_prepared: tuple[Store, Path], references: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    """FSDP2 over two CPU processes (the calls accelerate makes on GPUs), killed like the OOM killer kills: no
    process of the run survives its job, and its checkpoint (weights gathered, optimizer state gathered and keyed
    by position) resumes as one plain process. Every step of both follows the loss trajectory of the
    uninterrupted runs. (The other direction, a plain checkpoint loaded sharded, is the test below.)"""
    store, source = tiny_prepared
    expected = step_losses(references["two"][0])
    run_dir = clone_run(store, source, "killed-fsdp")
    cfg = TrainConfig(store=str(store.root), processes=2, sharding="fsdp", **SMALL)
    job = jobs.start("train", run_dir, cfg)
    deadline = time.monotonic() + 600
    while checkpoint.latest(run_dir) is None and job.running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.latest(run_dir) is not None and job.running(), "no checkpoint before the kill"
    os.kill(job.pid, signal.SIGKILL)  # the job's worker, as the OOM killer or `kill -9` would
    assert job.process is not None
    job.process.wait()
    deadline = time.monotonic() + 30
    while _processes_of(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_of(run_dir) == [], "ranks outlived their job"
    assert not jobs.busy(run_dir)
    before = losses(run_dir)
    assert before and all(loss == pytest.approx(expected[step], rel=2e-3) for step, loss in before.items()), \
        (before, expected)
    saved = checkpoint.load_state(checkpoint.latest(run_dir) or run_dir)
    assert saved.processes == 2 and saved.step == 2
    from safetensors import safe_open

    with safe_open(str(checkpoint.latest(run_dir) / "model" / "adapter_model.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) == 2 * 7 * 2  # every LoRA matrix of the model, whole: none is a shard
    offset = (run_dir / ev.EVENTS_FILE).stat().st_size
    resumed = jobs.run("train", run_dir, cfg.model_copy(update={"processes": 1, "sharding": "ddp", "grad_accum": 2,
                                                                "resume": True}))
    assert resumed.result["steps"] == 4 and resumed.result["resumed_from"] == 2
    logs = [e.message for e in ev.read_all(run_dir / ev.EVENTS_FILE, offset) if isinstance(e, ev.Log)]
    assert any("resumed from checkpoint step 2 (it was trained on 2 process(es), this run uses 1)" in m
               for m in logs), logs
    after = step_losses(run_dir)
    assert sorted(after) == [1, 2, 3, 4] and losses(run_dir, offset)  # steps 3 and 4 ran again, after the kill
    for step, loss in after.items():  # the optimizer state, schedule and data position all came back
        assert loss == pytest.approx(expected[step], rel=2e-3), (step, after, expected)
    assert resumed.result["eval_loss"] == pytest.approx(references["two"][1]["eval_loss"], rel=2e-3)


def test_auto_takes_the_hf_backend_for_several_processes_and_says_why() -> None:
    from appliance.train.model import choose_backend

    said: list[str] = []
    emit = ev.Emitter(lambda event: said.append(getattr(event, "message", "")))
    assert choose_backend(TrainConfig(store="/tmp/unused", processes=2), emit) == "hf"
    assert said and "Unsloth trains on one device" in said[0]
    assert choose_backend(TrainConfig(store="/tmp/unused", sharding="fsdp"), emit) == "hf"


@pytest.mark.slow
def test_stopping_a_distributed_job_stops_every_rank_at_one_step_after_a_checkpoint(
        tiny_prepared: tuple[Store, Path]) -> None:
    """The TUI's Stop and a Ctrl-C send the job SIGTERM: every rank stops at the same step boundary, one
    checkpoint is saved, and the job ends as cancelled, with how to continue."""
    store, source = tiny_prepared
    run_dir = clone_run(store, source, "stopped-two")
    job = jobs.start("train", run_dir, TrainConfig(store=str(store.root), processes=2,
                                                    **{**SMALL, "max_steps": 40, "save_every": 100}))
    for event in job.follow():
        if isinstance(event, ev.Progress) and event.phase == "training" and event.step >= 1:
            break
    job.cancel()
    with pytest.raises(jobs.Cancelled) as excinfo:
        job.wait()
    assert "checkpoint is saved" in excinfo.value.message and f"--resume {run_dir.name}" in excinfo.value.hint
    saved = checkpoint.checkpoint_dirs(run_dir)
    assert len(saved) == 1 and 1 <= checkpoint.load_state(saved[0]).step < 40
    assert _processes_of(run_dir) == [] and not (run_dir / "adapter").exists()
