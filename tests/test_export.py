"""Export of a real fine-tune of the default model, end to end on the CPU (the session's quickstart run):
merge, F16 GGUF, Q8_0 and Q4_K_M through the verification gate; the GGUF chats through llama-cpp-python with the trained
template and stops by itself, saying what the merged model says; a second export reuses what is
done; a full disk leaves nothing registered; a changed byte makes `appliance verify` name the file."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXPORT_PPL_TOKENS, clone_run, run_cli

from appliance import events as ev
from appliance import jobs, quants
from appliance.records import ExportedFile, ExportResult
from appliance.run import Run
from appliance.store import Store

Exported = tuple[Store, Path, ExportResult]

pytestmark = pytest.mark.slow
QUANTS = ["F16", "Q8_0", "Q4_K_M"]


def _files(result: ExportResult) -> dict[str, ExportedFile]:
    return {f.quant: f for f in result.files}


def test_every_file_passes_the_gate(exported: Exported) -> None:
    _store, run_dir, result = exported
    files = _files(result)
    assert list(files) == QUANTS and not result.rejected
    gguf = run_dir / "gguf"
    for quant, entry in files.items():
        assert entry.passed and Path(entry.path) == gguf / f"{result.name}-{quant}.gguf"
        assert entry.predicted_bytes is not None
        assert abs(entry.bytes - entry.predicted_bytes) / entry.bytes < 0.03  # the size shown beforehand
    # the 16-bit file against the merged model: the same greedy tokens except at near-ties (float32 sums against
    # llama.cpp's 16-bit ones), which the gate's parity check tells apart from real misses (asserted below)
    assert files["F16"].agreement is not None and files["F16"].agreement >= 0.9 and files["F16"].ppl_delta is None
    q8_delta = files["Q8_0"].ppl_delta
    assert q8_delta is not None and abs(q8_delta) < 0.05
    assert "Q5_0 instead of Q4_K" in (files["Q4_K_M"].note or "")
    report = Run.at(run_dir).verification()
    assert report is not None and report.passed and report.adapter_sha256 == result.merged.adapter_sha256
    for entry in report.files:
        statuses = {c.name: c.status for c in entry.checks}
        assert all(statuses[name] == "pass" for name in ("architecture", "tensor count", "chat template",
                                                           "special tokens", "tokenization", "end-of-turn tokens",
                                                           "stops")), entry
    assert {c.name: c.status for c in report.files[0].checks}["greedy parity"] == "pass"
    assert not list(run_dir.glob(".gguf-staging-*")) and not list(gguf.glob(".*.partial"))
    events = ev.read_all(run_dir / ev.EVENTS_FILE)
    artifacts = [e for e in events if isinstance(e, ev.Artifact)]
    assert sorted(Path(a.path).name for a in artifacts if a.kind == "gguf") == sorted(
        Path(f.path).name for f in result.files)
    # where llama.cpp ran the gate's files is said (here the runtime is the CPU build)
    placement = [e.message for e in events if isinstance(e, ev.Log) and "runs the gate's files" in e.message]
    assert placement and "the llama.cpp runtime was built for the CPU" in placement[-1]


def test_merged_model_is_peft_merge_tensor_for_tensor(exported: Exported) -> None:
    """The streamed merge gives exactly what peft's merge_and_unload gives (in float32, rounded once to bf16),
    every tensor, and so the logits of base + adapter; its own layer-wise check measured only the rounding."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _store, run_dir, result = exported
    merged = run_dir / "merged"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "merge.json"} <= {
        p.name for p in merged.iterdir()}
    assert json.loads((merged / "config.json").read_text()).get("quantization_config") is None
    record = result.merged
    assert record.device == "cpu" and record.dtype == "bfloat16" and not record.reused
    assert record.check == "layer-wise" and record.tensors_merged == 30 * 7  # every linear layer of 30 blocks
    assert record.max_relative_error is not None and 0 < record.max_relative_error < 2**-7  # bf16 rounding

    base = AutoModelForCausalLM.from_pretrained(Run.at(run_dir).base_model_dir(), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "The printer on floor 3 jams. Why?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        reference = tuned(input_ids=ids["input_ids"]).logits[0]
    expected = tuned.merge_and_unload().to(torch.bfloat16).state_dict()
    written = load_file(str(merged / "model.safetensors"))
    assert set(written) == set(load_file(str(Run.at(run_dir).base_model_dir() / "model.safetensors")))
    assert [name for name, tensor in written.items() if not torch.equal(tensor, expected[name])] == []
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=ids["input_ids"]).logits[0]
    # what the model says: the same next token nearly everywhere (bf16 rounding may flip a near tie)
    assert float((logits.argmax(-1) == reference.argmax(-1)).float().mean()) >= 0.9


_MEMORY = """
import json, sys
from pathlib import Path
import llama_cpp, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from appliance import events as ev, streamed, templating, toolchain
from appliance.export import gate, merge
from appliance.hardware import peak_rss_mb, reset_peak_rss, rss_mb

def measure(adapter, base, merged, f16):
    reset_peak_rss()  # after the imports: the baseline holds them, as a job's process does before it merges
    baseline = rss_mb()
    result = merge._merge_into(merged, adapter, base, "test", "cpu", ev.Emitter(lambda e: None))
    merge_peak = peak_rss_mb()
    if not f16.is_file():
        toolchain.convert_to_gguf(merged, f16, "f16")  # in the warm converter's process: planned on its own
    tokenizer = templating.load_tokenizer(merged)
    contract = templating.contract(tokenizer)
    conversations = [[{"role": "user", "content": f"Question {n}: my invoice was charged twice."},
                      {"role": "assistant", "content": "Please send the invoice number and we will refund it."}]
                     for n in range(12)]
    rows = gate.scored_rows(tokenizer, conversations, 256)
    prompts = [c[:1] for c in conversations[:3]]
    reset_peak_rss()
    gate_baseline = rss_mb()
    reference = gate.build_reference(f16, merged, tokenizer, contract, prompts, rows, 512)
    report = gate.verify_file(f16, "F16", reference, contract, None, reference.tensor_count, 512, True)
    print(json.dumps({"baseline": baseline, "merge_peak": merge_peak, "tensors": result.tensors_merged,
                      "gate_baseline": gate_baseline, "gate_peak": peak_rss_mb(),
                      "checks": {c.name: c.status for c in report.checks}}), flush=True)

with toolchain.warm_converter():  # forked before anything computes, as an export job's is
    for case in json.loads(sys.argv[1]):
        measure(*(Path(p) for p in case))
"""


def _one_b_class(folder: Path, default_model_dir: Path) -> Path:
    """A model with Llama 3.2 1B's widths (hidden 2048, MLP 8192, vocabulary 128,256: its largest tensor, the tied
    embedding, is a quarter of a billion weights) and two of its sixteen layers: random bf16 weights written a
    tensor at a time, the default's tokenizer (the converter pads the vocabulary)."""
    import torch

    from appliance import tensorfile

    hidden, inter, kv, vocab, layers = 2048, 8192, 512, 128256, 2
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for n in range(layers):
        shapes |= {f"model.layers.{n}.{name}": shape for name, shape in (
            ("input_layernorm.weight", (hidden,)), ("post_attention_layernorm.weight", (hidden,)),
            ("self_attn.q_proj.weight", (hidden, hidden)), ("self_attn.k_proj.weight", (kv, hidden)),
            ("self_attn.v_proj.weight", (kv, hidden)), ("self_attn.o_proj.weight", (hidden, hidden)),
            ("mlp.gate_proj.weight", (inter, hidden)), ("mlp.up_proj.weight", (inter, hidden)),
            ("mlp.down_proj.weight", (hidden, inter)))}
    shapes["model.norm.weight"] = (hidden,)
    folder.mkdir(parents=True)
    writer = tensorfile.Writer(folder / "model.safetensors", [(n, "BF16", s) for n, s in shapes.items()])
    generator = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            writer.write(name, torch.ones(shape, dtype=torch.bfloat16))
        else:
            writer.write(name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
    writer.close()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "vocab_size": vocab, "tie_word_embeddings": True, "max_position_embeddings": 2048,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        "torch_dtype": "bfloat16"}))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(default_model_dir / name, folder / name)
    return folder


def _random_adapter(base: Path, folder: Path, rank: int = 8) -> None:
    """A rank-8 LoRA adapter on every linear layer (random A and B, in float32 as trained) beside the base's
    tokenizer, as a run's adapter folder holds it."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
              "mlp.down_proj": (inter, h)}
    generator = torch.Generator().manual_seed(1)
    weights = {}
    for layer in range(layers):
        for module, (inputs, outputs) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            weights[f"{key}.lora_A.weight"] = torch.randn(rank, inputs, generator=generator) / 30
            weights[f"{key}.lora_B.weight"] = torch.randn(outputs, rank, generator=generator) / 30
    folder.mkdir()
    save_file(weights, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": sorted(m.split(".")[1] for m in shapes), "bias": "none"}))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(base / name, folder / name)


@pytest.mark.slow
def test_the_merge_and_the_gate_stay_within_a_bound_set_by_blocks_not_by_the_model(
        exported: Exported, default_model_dir: Path, tmp_path: Path) -> None:
    """At 135M (the session's export, 30 layers) and at a 1B-class shape (the widths of Llama 3.2 1B, whose
    tied embedding is 8 times the default's), peak memory over the process's baseline: the merge holds a copy
    chunk, a few float32 blocks of rows and the adapter (one bound, set by the block sizes, at both sizes, and
    below one bf16 copy of either model); the gate holds the mapped 16-bit GGUF, llama.cpp's cache and logits,
    and the largest float32 tensor of the merged model twice, never a float32 copy of the model: what the planner
    predicts for it, less the imports the baseline already holds. (bench/scale.py runs the whole pipeline at the
    shapes of Llama 3.2 1B and Llama 3.1 8B.)"""
    from appliance import pipeline_plan
    from appliance.export.merge import ROWS_AT_ONCE
    from appliance.tensorfile import COPY_CHUNK

    _store, run_dir, _result = exported
    one_b = _one_b_class(tmp_path / "one-b", default_model_dir)
    _random_adapter(one_b, tmp_path / "one-b-adapter")
    f16 = next((run_dir / "gguf").glob("*-F16.gguf"))  # the session's export: the F16 of that very merge
    cases = {"135M": (run_dir / "adapter", Run.at(run_dir).base_model_dir(), f16),
             "1B-class": (tmp_path / "one-b-adapter", one_b, tmp_path / "one-b-F16.gguf")}
    argument = json.dumps([[str(a), str(b), str(tmp_path / f"merged-{label}"), str(g)]
                           for label, (a, b, g) in cases.items()])
    done = subprocess.run([sys.executable, "-c", _MEMORY, argument], capture_output=True, text=True, timeout=900,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.strip().splitlines() if line.startswith("{")]
    # the blocks twice over: the allocator may keep the freed blocks of one piece of a tensor for the next
    blocks_mb = 2 * (COPY_CHUNK + 6 * ROWS_AT_ONCE * 4) / 2**20
    machine = pipeline_plan.Machine(ram_available_mb=1e6, ram_total_mb=1e6, disk_free_mb=1e9)  # not used by the gate
    for (label, (adapter, base, _gguf)), measured in zip(cases.items(), lines, strict=True):
        assert measured["checks"]["greedy parity"] == "pass", (label, measured)
        adapter_mb = (adapter / "adapter_model.safetensors").stat().st_size / 2**20
        bound = blocks_mb + adapter_mb + 64  # 64 MB: the tokenizer and slack
        model_mb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20
        merge_over = measured["merge_peak"] - measured["baseline"]
        assert merge_over < bound and merge_over < model_mb, (label, measured, bound, model_mb)
        config = json.loads((base / "config.json").read_text())
        planned = {s.stage: s for s in pipeline_plan.stages(config, pipeline_plan.Choices(), machine)}["gate"]
        assert measured["gate_peak"] - measured["gate_baseline"] < planned.ram_mb - pipeline_plan.TORCH_RUNTIME_MB, (
            label, measured, planned.ram_mb)
    assert lines[0]["tensors"] == 210 and lines[1]["tensors"] == 14
    print({label: {"merge over baseline MB": round(m["merge_peak"] - m["baseline"]),
                   "gate over baseline MB": round(m["gate_peak"] - m["gate_baseline"])}
           for label, m in zip(cases, lines, strict=True)})


def test_the_merge_refuses_before_writing_when_the_disk_is_short_with_free_space_mocked(
        exported: Exported, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.errors import ApplianceError
    from appliance.export import merge

    store, source, _ = exported
    run_dir = _clone_exported(store, source, "short-disk", merged=False)
    monkeypatch.setattr(merge, "disk_free_mb", lambda path: 100)  # the only thing mocked: the free-space call
    with pytest.raises(ApplianceError) as refused:
        merge.merge(Run.at(run_dir), Run.at(run_dir).base_model_dir(), ev.Emitter(lambda event: None))
    need = ((Run.at(run_dir).base_model_dir() / "model.safetensors").stat().st_size + (64 << 20)) / 1e9
    assert f"needs {need:.2f} GB and the store's disk has 0.10 GB free" in refused.value.message
    assert not (run_dir / "merged").exists() and not list(run_dir.glob(".merged-*"))


def test_the_gguf_files_are_refused_before_writing_when_the_disk_is_short_with_free_space_mocked(
        exported: Exported, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.config import ExportConfig
    from appliance.errors import ApplianceError
    from appliance.export import run as export_run

    store, source, _ = exported
    run_dir = _clone_exported(store, source, "short-disk-gguf", merged=True)
    monkeypatch.setattr(export_run, "disk_free_mb", lambda path: 100)  # the only thing mocked: the free-space call
    cfg = ExportConfig(quants=["Q8_0"], store=str(store.root))
    with pytest.raises(ApplianceError) as refused:
        export_run.run(cfg, run_dir, ev.Emitter(lambda event: None))
    merged = Run.at(run_dir).merged_dir
    f16, q8 = (quants.predict(merged, q).bytes for q in ("F16", "Q8_0"))
    assert (f"the GGUF files need {(f16 + q8 + (64 << 20)) / 1e9:.2f} GB (F16 {f16 / 1e9:.2f} GB, Q8_0 "
            f"{q8 / 1e9:.2f} GB) and the store's disk has 0.10 GB free") in refused.value.message
    assert "--quant" in refused.value.hint
    assert not (run_dir / "gguf").exists() and not list(run_dir.glob(".gguf-staging-*"))


@pytest.mark.parametrize(("setting", "named"), [({"use_dora": True}, "DoRA"),
                                                ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                                                ({"bias": "all"}, "trained biases")])
def test_an_adapter_the_merge_cannot_apply_is_refused_by_name(exported: Exported, tmp_path: Path,
                                                              setting: dict[str, object], named: str) -> None:
    from appliance.errors import ApplianceError
    from appliance.export.merge import lora_deltas

    _store, run_dir, _ = exported
    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **setting}))
    with pytest.raises(ApplianceError) as refused:
        lora_deltas(adapter)
    assert named in refused.value.message and "plain LoRA" in refused.value.hint


def test_gguf_chats_with_the_trained_template_and_stops(exported: Exported) -> None:
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _store, run_dir, result = exported
    row = json.loads((run_dir / "data" / "test.jsonl").read_text().splitlines()[0])
    messages = row["messages"][:-1]
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    hf_answer = tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    for quant in ("F16", "Q4_K_M"):
        llm = Llama(_files(result)[quant].path, n_ctx=1024, verbose=False, seed=0)  # template from the GGUF
        try:
            reply = llm.create_chat_completion(messages, temperature=0.0, max_tokens=128)
        finally:
            llm.close()
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "stop", choice  # ended its turn by itself
        if quant == "F16":
            assert choice["message"]["content"].strip() == hf_answer
    assert hf_answer in Run.at(run_dir).require_data_report().label_set  # eight steps taught it the answer format


def test_modelfile_and_commands_follow_the_contract(exported: Exported) -> None:
    _store, run_dir, result = exported
    gguf = run_dir / "gguf"
    modelfile = (gguf / "Modelfile").read_text()
    system = json.loads((run_dir / "data" / "train.jsonl").read_text().splitlines()[0])["messages"][0]["content"]
    assert modelfile.startswith(f"FROM ./{result.name}-Q4_K_M.gguf\n")
    assert f'SYSTEM """{system}"""' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert (gguf / "chat_template.jinja").read_text() == (run_dir / "merged" / "chat_template.jinja").read_text()
    assert "--jinja --chat-template-file" in result.commands["llama-server"]
    assert result.commands["appliance"].startswith(f"appliance serve {run_dir.name}")
    assert "ollama create" in (gguf / "README.md").read_text()


def test_cluster_engines_get_launch_scripts_for_the_merged_model(
        exported: Exported) -> None:
    """vLLM and TGI serve the merged 16-bit model with the trained chat template, offline, over the GPUs the
    planner suggests (one 24 GiB GPU is plenty for 135M parameters)."""
    _store, run_dir, result = exported
    gguf = run_dir / "gguf"
    vllm, tgi = (gguf / "vllm.sh").read_text(), (gguf / "tgi.sh").read_text()
    for script in (vllm, tgi):
        assert f'"{run_dir / "merged"}"' in script and 'TP="${TP:-1}"' in script
        assert "HF_HUB_OFFLINE=1" in script and "VLLM_NO_USAGE_STATS=1" in script
        assert "127.0.0.1" in script and "0.0.0.0" not in script  # loopback unless the operator says otherwise
    assert f'--chat-template "{gguf / "chat_template.jinja"}"' in vllm and "--num-shard" in tgi
    assert "TP=1: weights 0.3 GiB" in vllm
    assert all(os.access(gguf / name, os.X_OK) for name in ("vllm.sh", "tgi.sh"))
    assert result.commands["vllm"] == f"sh {gguf / 'vllm.sh'}"
    assert "More traffic than one llama.cpp process" in (gguf / "README.md").read_text()
    for name in ("vllm.sh", "tgi.sh"):  # the shell parses them
        assert subprocess.run(["sh", "-n", str(gguf / name)], check=False).returncode == 0


def test_manifest_covers_the_export_and_verifies(exported: Exported) -> None:
    store, run_dir, result = exported
    run = Run.at(run_dir)
    data = run.manifest()
    assert data is not None and data.inputs.base_model is not None and data.verification is not None
    for f in result.files:
        assert data.files[f"gguf/{Path(f.path).name}"].sha256 == f.sha256
    assert "merged/model.safetensors" in data.files and "adapter/adapter_model.safetensors" in data.files
    assert "model.safetensors" in data.inputs.base_model.files
    assert data.verification["passed"] and "quants" in run.settings("export")
    verified = run_cli("verify", run_dir.name, "--json", store=store.root)
    assert verified.returncode == 0, verified.stdout
    assert json.loads(verified.stdout)["ok"]


def test_second_export_reuses_the_merge_and_the_files(exported: Exported) -> None:
    store, run_dir, first = exported
    result = run_cli("export", "--run", run_dir.name, "--quant", "Q4_K_M,Q6_K", "--ppl-tokens",
                     str(EXPORT_PPL_TOKENS), "--json", store=store.root)
    assert result.returncode == 0, result.stderr
    second = ExportResult.model_validate_json(result.stdout)
    assert second.merged.reused
    files = _files(second)
    assert list(files) == ["F16", "Q4_K_M", "Q6_K", "Q8_0"]  # Q8_0 from the first export is kept
    for quant in ("F16", "Q8_0", "Q4_K_M"):
        assert files[quant].seconds == 0.0 and files[quant].sha256 == _files(first)[quant].sha256
    assert files["Q6_K"].passed and files["Q6_K"].seconds > 0
    assert run_cli("verify", run_dir.name, store=store.root).returncode == 0


def test_a_changed_byte_in_a_gguf_is_named_by_verify(exported: Exported) -> None:
    store, run_dir, result = exported
    target = Path(_files(result)["Q8_0"].path)
    original = target.read_bytes()
    try:
        with open(target, "r+b") as handle:
            handle.seek(len(original) // 2)
            handle.write(bytes([original[len(original) // 2] ^ 0x01]))
        outcome = run_cli("verify", run_dir.name, store=store.root)
        assert outcome.returncode == 1
        assert f"changed: {run_dir.name}/gguf/{target.name}" in outcome.stdout
    finally:
        target.write_bytes(original)


def _clone_exported(store: Store, source: Path, name: str, merged: bool, reference: bool = False) -> Path:
    """A run with the exported run's data, settings and adapter (and merged model), exported from scratch; with
    `reference`, its verified 16-bit GGUF (a link) and verification record come along, so that an export of the
    clone keeps that file as a second export would, and converts nothing but what the test is about."""
    run_dir = clone_run(store, source, name)
    shutil.copy(source / "run.yaml", run_dir / "run.yaml")
    shutil.copytree(source / "adapter", run_dir / "adapter")
    if merged:
        shutil.copytree(source / "merged", run_dir / "merged")
    if reference:
        record = Run.at(source).verification_path
        (run_dir / "gguf").mkdir()
        shutil.copy(record, run_dir / "gguf" / record.name)
        f16 = next(source.glob("gguf/*-F16.gguf"))
        os.link(f16, run_dir / "gguf" / f16.name)
    return run_dir


def test_a_file_that_fails_the_gate_is_kept_aside_and_not_registered(
        exported: Exported, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quantizer that loses the chat template (planted): that file goes to gguf-rejected/ with its
    report; the 16-bit reference that passed is registered, and the manifest lists only it."""
    from appliance import gguf_meta, toolchain
    from appliance.config import ExportConfig
    from appliance.export import run as export_run

    store, source, _ = exported
    run_dir = _clone_exported(store, source, "planted", merged=True, reference=True)
    real_quantize = toolchain.quantize

    def lossy_quantize(src: Path, dst: Path, quant: str, threads: int = 0) -> None:
        real_quantize(src, dst.with_name("raw.gguf"), quant, threads)
        gguf_meta.rewrite(dst.with_name("raw.gguf"), dst, drop=("tokenizer.chat_template",))
        dst.with_name("raw.gguf").unlink()

    monkeypatch.setattr(export_run.toolchain, "quantize", lossy_quantize)
    events: list[ev.Event] = []
    cfg = ExportConfig(quants=["Q8_0"], ppl_tokens=256, store=str(store.root))
    result = export_run.run(cfg, run_dir, ev.Emitter(events.append))
    assert result.rejected == ["Q8_0"] and result.merged.reused
    files = {f.quant: f for f in result.files}
    assert files["F16"].passed and not files["Q8_0"].passed
    rejected = Path(result.rejected_dir or "")
    assert Path(files["Q8_0"].path) == rejected / f"{result.name}-Q8_0.gguf" and Path(files["Q8_0"].path).is_file()
    report = Run.at(run_dir).verification(rejected)
    assert report is not None
    assert [c.name for c in report.files[0].checks if c.status == "fail"] == ["chat template"]
    assert sorted(p.name for p in (run_dir / "gguf").glob("*.gguf")) == [f"{result.name}-F16.gguf"]
    listed = Run.at(run_dir).manifest()
    assert listed is not None and not [name for name in listed.files if "Q8_0" in name]
    assert any(isinstance(e, ev.Log) and e.level == "error" and "failed verification" in e.message for e in events)


def _export_limited(store: Store, run_dir: Path, limit: int) -> subprocess.CompletedProcess[str]:
    """`appliance export` with every file it writes capped at `limit` bytes, as on a nearly full disk."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "APPLIANCE_HOME": str(store.root)}
    return subprocess.run([sys.executable, "-m", "appliance", "export", "--run", run_dir.name, "--quant", "Q8_0"],
                          capture_output=True, text=True, env=env, preexec_fn=cap, timeout=600, check=False)


@pytest.mark.parametrize("stage", ["merge", "convert"])
def test_a_full_disk_leaves_nothing_registered(stage: str, exported: Exported) -> None:
    store, source, _ = exported
    # with the merge done already, the conversion is the first big write
    run_dir = _clone_exported(store, source, f"disk-full-{stage}", merged=stage == "convert")
    result = _export_limited(store, run_dir, 64 * 2**20)
    assert result.returncode == 1
    assert "the disk is full (or a file-size limit was hit)" in result.stderr, result.stderr
    assert "Free space" in result.stderr and "Traceback" not in result.stderr
    assert not (run_dir / "gguf").exists() and not Run.at(run_dir).manifest_path.exists()
    assert (run_dir / "merged").exists() == (stage == "convert")
    # the run's lock file stays (it is the lock, empty); nothing else hidden may be left behind
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".") and p.name != jobs.LOCK_FILE] == []


def test_adapter_alone_as_gguf_serves_like_the_merged_model(exported: Exported) -> None:
    """--lora-gguf: the adapter as a GGUF adapter plus the base as GGUF, verified together: llama.cpp
    with the adapter applied picks the merged model's greedy tokens and ends its turns."""
    from appliance.config import ExportConfig
    from appliance.export import run as export_run

    store, source, _ = exported
    run_dir = _clone_exported(store, source, "lora-gguf", merged=True, reference=True)
    cfg = ExportConfig(quants=[], lora_gguf=True, ppl_tokens=256, store=str(store.root))
    result = export_run.run(cfg, run_dir, ev.Emitter(lambda event: None))
    files = {f.quant: f for f in result.files}
    assert set(files) == {"F16", "LORA", "BASE"} and all(f.passed for f in files.values()) and not result.rejected
    assert files["LORA"].bytes < files["F16"].bytes / 10  # a rank-8 adapter: a small file
    record = Run.at(run_dir).verification()
    assert record is not None
    lora = record.file("LORA")
    assert lora is not None and lora.agreement is not None and lora.agreement >= 0.85  # measured: 0.88 to 1.0
    checks = {c.name: c.status for c in lora.checks}
    assert checks["adapter metadata"] == "pass" and checks["stops"] in ("pass", "warn")
