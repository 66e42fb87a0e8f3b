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


_WARM = """
import json, os, signal, sys
from pathlib import Path
from appliance import toolchain, unused
unused.keep_out(unused.NEVER_USED + unused.GPU_ONLY)  # as a job's process does
model, out = Path(sys.argv[1]), Path(sys.argv[2])
lock = os.open(out / "job.lock", os.O_RDWR | os.O_CREAT)  # a file the job holds open, as a job holds its run's lock
with toolchain.warm_converter():
    warm = toolchain._warm.pid
    toolchain.convert_to_gguf(model, out / "warm-F16.gguf", "f16", log=out / "warm.log")
    try:
        toolchain.convert_to_gguf(out / "missing", out / "missing-F16.gguf", "f16")
        failed = ""
    except toolchain.ToolchainError as exc:
        failed = exc.message
    held = sorted(os.readlink(f"/proc/{warm}/fd/{fd}") for fd in os.listdir(f"/proc/{warm}/fd"))
    print(json.dumps({"warm": warm, "failed": failed, "held": held}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the job killed while its warm converter lives
"""


def test_the_warm_converter_writes_what_the_converter_writes_and_dies_with_its_job(
        quantized: Path, default_model_dir: Path, tmp_path: Path) -> None:
    """An export's conversions run in a process forked from the job before it computes (toolchain.WarmConverter):
    the same bytes as the converter's own process (the module's F16, converted that way), its failure reported
    the same way, none of the job's files held open, and nothing left running when the job is killed."""
    import hashlib
    import json
    import subprocess
    import sys
    import time

    done = subprocess.run([sys.executable, "-c", _WARM, str(default_model_dir), str(tmp_path)], capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == -9, done.stderr[-3000:]
    reported = json.loads(done.stdout.strip().splitlines()[-1])
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "warm-F16.gguf",
                                                                   quantized.with_name("model-F16.gguf"))]
    assert digest[0] == digest[1]
    assert "Model successfully exported" in (tmp_path / "warm.log").read_text()
    assert "converting " in reported["failed"] and "is not a directory" in reported["failed"], reported
    assert not (tmp_path / "missing-F16.gguf").exists() and not list(tmp_path.glob(".*partial"))
    assert not [path for path in reported["held"] if path.startswith("/") and "job.lock" in path], reported["held"]
    def alive(pid: int) -> bool:  # a zombie waiting for init to reap it has ended
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 10
    while alive(reported["warm"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(reported["warm"]), "the warm converter outlived its job"
