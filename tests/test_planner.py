"""The memory planner predicts the measured peak within 30% on the CPU, and a run that cannot fit
is refused before anything loads, with the nearest setting that fits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import DEFAULT_MODEL, clone_run

from appliance import jobs, planner
from appliance.config import TrainConfig
from appliance.records import TrainResult
from appliance.store import Store


@pytest.mark.slow
@pytest.mark.parametrize(("batch_size", "checkpointing"), [(2, False), (8, True)])
def test_prediction_is_within_30_percent_of_measured_peak(batch_size: int, checkpointing: bool,
                                                          prepared: tuple[Store, Path]) -> None:
    store, source = prepared
    run_dir = clone_run(store, source, f"plan-{batch_size}-{checkpointing}")
    cfg = TrainConfig(store=str(store.root), max_steps=1, batch_size=batch_size, max_seq_len=256,
                      gradient_checkpointing=checkpointing, eval_every=1000, save_every=1000, backend="hf",
                      task_eval_items=0)
    done = jobs.start("train", run_dir, cfg).wait()
    measured = TrainResult.model_validate(done.result).peak_mem_mb
    planned = next(e.value for e in jobs.ev.read_all(run_dir / "events.jsonl")
                   if isinstance(e, jobs.ev.Metric) and e.name == "planned_peak_mb")
    assert abs(planned - measured) / measured < 0.30, (planned, measured)


def test_impossible_setting_is_refused_with_the_nearest_fit(default_model_dir: Path) -> None:
    cfg = TrainConfig(store="/tmp/unused", batch_size=64, max_seq_len=4096)
    tight = planner.plan(cfg, default_model_dir, 134_515_008, 4096, "cpu", available_mb=8000)
    assert not tight.fits and tight.peak_mb > 8000
    change, fitted = planner.nearest_fit(cfg, default_model_dir, 134_515_008, 4096, "cpu", 8000) or ({}, None)
    assert fitted is not None and fitted.fits
    assert change["gradient_checkpointing"] is True
    assert change.get("batch_size", 64) * change.get("grad_accum", 1) == 64  # same effective batch
    assert planner.as_flags(change).startswith("--gradient-checkpointing")


@pytest.mark.slow
def test_refusal_through_the_job(prepared: tuple[Store, Path]) -> None:
    store, source = prepared
    run_dir = clone_run(store, source, "too-big")
    cfg = TrainConfig(store=str(store.root), batch_size=1024, max_steps=1, backend="hf")
    with pytest.raises(jobs.JobFailed) as excinfo:
        jobs.start("train", run_dir, cfg).wait()
    assert "GiB of cpu memory but" in excinfo.value.message
    assert "--gradient-checkpointing" in excinfo.value.hint and "--batch-size" in excinfo.value.hint
    assert not (run_dir / "checkpoints").exists()


def test_lora_parameter_count_matches_peft(default_model_dir: Path) -> None:
    import json

    config = json.loads((default_model_dir / "config.json").read_text())
    assert planner._lora_params(config, 16, "all-linear") == 4_884_480  # what peft reported for this model
    assert DEFAULT_MODEL in str(default_model_dir)


def test_a_worker_reports_its_own_peak_memory_not_its_parents() -> None:
    """A job worker started from a large process (a test session holding models) must not inherit
    that process's peak: ru_maxrss survives exec, so the planner's check would compare against it."""
    import subprocess
    import sys

    ballast = bytearray(600 * 2**20)
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))  # touch every page
    code = "from appliance.hardware import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 300, child
    del ballast


LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
            "tie_word_embeddings": False}
GIB = 2**30


def test_a_model_is_sized_from_its_config_alone() -> None:
    assert planner.model_params(LLAMA_7B) == 6_738_415_616  # Llama-2-7B's published count
    assert planner.layer_params(LLAMA_7B) == 4 * 4096 * 4096 + 3 * 4096 * 11008 == 202_375_168
    assert planner._lora_params(LLAMA_7B, 16, "all-linear") == 32 * 16 * (4 * 8192 + 3 * 15104) == 39_976_960


def _plan(processes: int, sharding: str, method: str = "lora") -> planner.Plan:
    cfg = TrainConfig(store="/tmp/unused", dtype="bfloat16", batch_size=1, max_seq_len=512, method=method,
                      gradient_checkpointing=True, processes=processes, sharding=sharding)
    return planner.plan_from_config(cfg, LLAMA_7B, 6_738_415_616, 512, "cuda", 24 * 1024, backend="hf")


def test_ddp_costs_each_device_a_gradient_bucket_and_saves_none() -> None:
    one, two, eight = _plan(1, "ddp"), _plan(2, "ddp"), _plan(8, "ddp")
    # an fp32 copy of the LoRA gradients, as the caching allocator holds it
    assert (two.peak_mb - one.peak_mb) * 2**20 == pytest.approx(39_976_960 * 4 * planner.ALLOCATOR_OVERHEAD)
    assert eight.peak_mb == pytest.approx(two.peak_mb)  # a whole replica everywhere, however many
    assert one.weights_mb * 2**20 == 6_738_415_616 * 2


def test_fsdp_shards_weights_and_state_and_gathers_two_layers() -> None:
    four = _plan(4, "fsdp")
    assert four.weights_mb * 2**20 == pytest.approx(6_738_415_616 * 2 / 4)
    assert four.trainable_state_mb * 2**20 == pytest.approx(39_976_960 * 16 / 4)
    # two layers in flight at bf16, plus the embeddings and the untied head of the root unit
    assert four.gathered_mb * 2**20 == pytest.approx(2 * 202_375_168 * 2 + 2 * 32000 * 4096 * 2)
    assert four.peak_mb == pytest.approx(planner.CUDA_CONTEXT_MB + planner.ALLOCATOR_OVERHEAD * (
        four.weights_mb + four.trainable_state_mb + four.gathered_mb + four.activations_mb))
    assert _plan(1, "fsdp").gathered_mb == 0  # one process holds everything anyway


def test_the_fewest_gpus_for_full_fine_tuning_of_a_7b_model() -> None:
    cfg = TrainConfig(store="/tmp/unused", dtype="bfloat16", batch_size=1, max_seq_len=512, method="full",
                      gradient_checkpointing=True, sharding="fsdp")
    found = planner.devices_needed(cfg, LLAMA_7B, 6_738_415_616, 512, 80 * 1024)
    assert found is not None
    devices, per_device = found
    # by hand: bf16 weights and 16 bytes of AdamW state per weight, sharded; what is not sharded stays; all of it
    # as the caching allocator holds it, beside the CUDA context
    sharded = 6_738_415_616 * (2 + 16) * planner.ALLOCATOR_OVERHEAD
    fixed = ((2 * 202_375_168 * 2 + 2 * 32000 * 4096 * 2) + per_device.activations_mb * 2**20) \
        * planner.ALLOCATOR_OVERHEAD + planner.CUDA_CONTEXT_MB * 2**20
    assert devices == math.ceil(sharded / (0.95 * 80 * GIB - fixed)) == 2
    assert per_device.fits and per_device.processes == 2
    ddp = planner.devices_needed(cfg.model_copy(update={"sharding": "ddp"}), LLAMA_7B, 6_738_415_616, 512,
                                 80 * 1024)
    assert ddp is None  # 121 GB of weights and state on every GPU: no number of 80 GiB GPUs holds a replica
    lora = planner.devices_needed(cfg.model_copy(update={"method": "lora"}), LLAMA_7B, 6_738_415_616, 512,
                                  24 * 1024)
    assert lora is not None and lora[0] == 1


def test_the_plan_command_sizes_a_model_from_its_config(tmp_path: Path, store_dir: Path) -> None:
    import json

    from conftest import run_cli

    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_7B))
    result = run_cli("train", "plan", "--config", str(config), "--gpu-memory", "80", "--batch-size", "1",
                     "--max-seq-len", "512", "--gradient-checkpointing", "--json", store=store_dir)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["parameters"] == 6_738_415_616
    fewest = {row["method"]: row["fewest_gpus"] for row in report["plans"]}
    assert fewest["full"] == {"ddp": None, "fsdp": 2} and fewest["lora"] == {"ddp": 1, "fsdp": 1}
    full = next(row for row in report["plans"] if row["method"] == "full")["per_gpu_gib"]
    assert full["fsdp"]["8"] < full["fsdp"]["2"] < full["fsdp"]["1"] <= full["ddp"]["2"]


def test_the_serving_plan_splits_a_model_over_the_fewest_gpus() -> None:
    # Llama-2-7B: 13.5 GB of fp16 weights; K and V of 32 layers x 32 heads x 128 = 512 KiB a token, 8 x 4096 tokens
    seven = planner.serving_plan({**LLAMA_7B, "max_position_embeddings": 4096}, 24 * 1024, 4096)
    need_mb = (6_738_415_616 * 2 + 2 * 32 * 32 * 128 * 2 * 4096 * 8) / 2**20
    assert seven.kv_mb_per_token * 2**20 == 524_288
    assert need_mb + 1536 > 0.9 * 24 * 1024 >= need_mb / 2 + 1536  # one 24 GiB GPU is too small, two are not
    assert seven.tensor_parallel == 2 and seven.per_gpu_mb == pytest.approx(need_mb / 2 + 1536)
    seventy = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
               "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False}
    assert planner.model_params(seventy) == 68_976_648_192  # Llama-2-70B
    assert planner.serving_plan(seventy, 80 * 1024, 4096).tensor_parallel == 2  # 138 GB + 10.7 GB of KV
    assert planner.serving_plan(seventy, 16 * 1024, 4096).tensor_parallel is None  # not even on 8
