"""Safetensors read and written a piece at a time, and the streamed merge on tiny random models: the same
tensors as peft's merge for every LoRA variant it applies (rsLoRA, per-layer alphas, embeddings), a fully
fine-tuned model copied in the base's dtype, and files the readers of the format agree with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from appliance import events as ev
from appliance import tensorfile
from appliance.errors import ApplianceError
from appliance.export import merge


def test_written_piece_by_piece_reads_back_with_safetensors(tmp_path: Path) -> None:
    tensors = {"embed": torch.randn(7, 5).to(torch.bfloat16), "scalar": torch.tensor(3.5),
               "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3), "empty": torch.zeros(0, 4),
               "half": torch.randn(3, 2, 2).half()}
    layout = [(name, tensorfile.dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
    writer = tensorfile.Writer(tmp_path / "out.safetensors", layout)
    writer.write("embed", tensors["embed"][:3])  # rows in pieces
    writer.write("embed", tensors["embed"][3:])
    writer.write("scalar", tensors["scalar"])
    writer.write("ids", tensors["ids"])
    writer.write("half", tensors["half"])  # "empty" has no bytes: nothing to write
    writer.close()
    back = load_file(str(tmp_path / "out.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())

    with tensorfile.Reader(tmp_path / "out.safetensors") as reader:
        assert all(torch.equal(reader.read(k), v) for k, v in tensors.items())
        assert torch.equal(reader.rows(reader.tensors["embed"], 2, 5), tensors["embed"][2:5])
        assert b"".join(bytes(p) for p in reader.chunks(reader.tensors["ids"], size=16)) == \
            tensors["ids"].numpy().tobytes()


def test_the_writer_refuses_out_of_order_and_short_tensors(tmp_path: Path) -> None:
    layout = [("a", "F32", (2,)), ("b", "F32", (2,))]
    writer = tensorfile.Writer(tmp_path / "x.safetensors", layout)
    with pytest.raises(tensorfile.TensorFileError, match="wrote b where a comes next"):
        writer.write("b", torch.zeros(2))
    writer.write("a", torch.zeros(2))
    with pytest.raises(tensorfile.TensorFileError, match="tensor b was not written in full"):
        writer.close()


def test_a_truncated_file_is_named_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(tensorfile.TensorFileError) as refused:
        tensorfile.Reader(path)
    assert str(path) in refused.value.message and "again" in refused.value.hint


def _tiny(folder: Path, dtype: torch.dtype, default_model_dir: Path) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(str(folder), safe_serialization=True)
    for file in default_model_dir.iterdir():  # a run's adapter folder carries the tokenizer
        if file.name.startswith(("tokenizer", "chat_template")):
            shutil.copy2(file, folder / file.name)
    return model


@pytest.mark.parametrize("lora", [
    {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    {"r": 8, "lora_alpha": 4, "use_rslora": True, "alpha_pattern": {"q_proj": 32}, "rank_pattern": {"down_proj": 2},
     "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"]},
], ids=["plain", "rslora-patterns-embedding"])
def test_the_streamed_merge_is_peft_merge_on_tiny_models(tmp_path: Path, default_model_dir: Path,
                                                         lora: dict[str, Any]) -> None:
    from peft import LoraConfig, get_peft_model

    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    _tiny(base_dir, torch.bfloat16, default_model_dir)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    tuned = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))  # random B: a real change
    tuned.save_pretrained(str(adapter_dir))
    for file in base_dir.iterdir():
        if file.name.startswith(("tokenizer", "chat_template")):
            shutil.copy2(file, adapter_dir / file.name)
    expected = tuned.merge_and_unload().to(torch.bfloat16).state_dict()
    result = merge._merge_into(out, adapter_dir, base_dir, "test", "cpu", ev.Emitter(lambda event: None))
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(load_file(str(base_dir / "model.safetensors")))
    assert [name for name, tensor in written.items() if not torch.equal(tensor, expected[name])] == []
    assert result.max_relative_error is not None and result.max_relative_error < 2**-7
    changed = [name for name in written if not torch.equal(written[name], load_file(
        str(base_dir / "model.safetensors"))[name])]
    assert len(changed) == result.tensors_merged


def test_a_fully_fine_tuned_model_is_copied_in_the_base_dtype(tmp_path: Path, default_model_dir: Path) -> None:
    base_dir, trained, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    _tiny(base_dir, torch.bfloat16, default_model_dir)
    model = _tiny(trained, torch.float32, default_model_dir)  # trained in float32
    result = merge._merge_into(out, trained, base_dir, "test", "cpu", ev.Emitter(lambda event: None))
    written = load_file(str(out / "model.safetensors"))
    expected = model.to(torch.bfloat16).state_dict()
    assert all(torch.equal(t, expected[name]) and t.dtype == torch.bfloat16 for name, t in written.items())
    assert result.check.startswith("none") and result.tensors_merged == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_an_adapter_for_another_model_is_refused_before_writing(tmp_path: Path, default_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    _tiny(base_dir, torch.bfloat16, default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(adapter_dir))
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    save_file({k.replace("layers.1.", "layers.7."): v for k, v in weights.items()},
              str(adapter_dir / "adapter_model.safetensors"))
    out.mkdir()
    with pytest.raises(ApplianceError) as refused:
        merge._merge_into(out, adapter_dir, base_dir, "test", "cpu", ev.Emitter(lambda event: None))
    assert "model.layers.7.self_attn.q_proj.weight" in refused.value.message and list(out.iterdir()) == []
