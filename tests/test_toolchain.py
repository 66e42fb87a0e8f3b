"""The installed toolchain, proven on the real default model: transformers answers a factual
question; the installed converter and quantizer turn the model into GGUF; llama.cpp loads it
and gives the same greedy answer, with the chat template and end-of-turn token intact."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import toolchain

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def hf_answer(default_model_dir: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    text: str = tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return text.strip()


def test_default_model_answers_a_factual_question(hf_answer: str) -> None:
    assert "Paris" in hf_answer


@pytest.fixture(scope="module")
def quantized(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf")
    f16 = out / "model-F16.gguf"
    toolchain.convert_to_gguf(default_model_dir, f16, "f16", log=out / "convert.log")
    q8 = out / "model-Q8_0.gguf"
    toolchain.quantize(f16, q8, "Q8_0")
    assert not list(out.glob(".*partial"))  # written atomically
    return q8


def test_converted_gguf_keeps_tokenizer_and_template(quantized: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(quantized))

    def field(key: str) -> object:
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 30
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "smollm"  # the converter recognised the pre-tokenizer
    tokens = reader.fields["tokenizer.ggml.tokens"]
    eos_id = field("tokenizer.ggml.eos_token_id")
    assert isinstance(eos_id, int)
    assert bytes(tokens.parts[tokens.data[eos_id]]).decode() == "<|im_end|>"
    assert "<|im_start|>" in str(field("tokenizer.chat_template"))


def test_llama_cpp_gives_the_same_greedy_answer(quantized: Path, hf_answer: str) -> None:
    from llama_cpp import Llama

    llm = Llama(str(quantized), n_ctx=512, verbose=False, seed=0)
    try:
        reply = llm.create_chat_completion(MESSAGES, temperature=0.0, max_tokens=MAX_TOKENS)
    finally:
        llm.close()
    assert reply["choices"][0]["message"]["content"].strip() == hf_answer


def test_unknown_quantization_is_explained(quantized: Path, tmp_path: Path) -> None:
    from appliance.errors import ToolchainError

    with pytest.raises(ToolchainError, match="unknown quantization"):
        toolchain.quantize(quantized, tmp_path / "x.gguf", "Q9_Z")
    assert not (tmp_path / "x.gguf").exists()


def test_runtime_is_built_for_any_x86_64_with_avx2() -> None:
    """No -march=native: the runtime has no AVX-512 or AMX instructions, so a wheelhouse build runs
    on other x86-64 CPUs than the one that built it."""
    import platform
    import shutil
    import subprocess

    if platform.machine() != "x86_64" or shutil.which("objdump") is None:
        pytest.skip("needs x86-64 and objdump")
    lib_dir = Path(toolchain.runtime_info().path) / "lib"
    libraries = sorted(lib_dir.glob("libggml-cpu.so")) + sorted(lib_dir.glob("libllama.so"))
    assert libraries
    for library in libraries:
        disassembly = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)],
                                     capture_output=True, text=True, check=True).stdout
        assert "%zmm" not in disassembly, f"{library.name} uses AVX-512"
        assert "tileloadd" not in disassembly and "tdpb" not in disassembly, f"{library.name} uses AMX"
    cpu = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib_dir / "libggml-cpu.so")],
                         capture_output=True, text=True, check=True).stdout
    assert "%ymm" in cpu  # AVX2 kernels are there
