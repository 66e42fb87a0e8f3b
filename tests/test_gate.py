"""The verification gate catches each failure it exists for, planted in a GGUF: the chat template
removed, a wrong EOS id, a tokenizer that splits text differently, weights that are not the merged
model's. The untouched file passes every check, so each failure is the planted one and nothing else.
The files come from a tiny random-weight Llama with the default model's tokenizer (the gate's
mechanics, fast); the real model passes the same gate end to end in test_export."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import gguf_meta, templating, toolchain
from appliance.export import gate
from appliance.templating import ChatContract

PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "user", "content": "Name a primary colour. One word."}]]
VALIDATION = [[{"role": "user", "content": "Which city hosts the Louvre?"},
               {"role": "assistant", "content": "Paris hosts the Louvre."}]]


@pytest.fixture(scope="module")
def reference_gguf(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gate") / "model-F16.gguf"
    toolchain.convert_to_gguf(tiny_model_dir, out, "f16")
    return out


def _reference(gguf: Path, merged_dir: Path) -> tuple[gate.Reference, ChatContract]:
    from appliance.templating import load_tokenizer

    tokenizer = load_tokenizer(merged_dir)
    contract = templating.contract(tokenizer)
    rows = gate.scored_rows(tokenizer, VALIDATION, budget=512)
    return gate.build_reference(gguf, merged_dir, tokenizer, contract, PROMPTS, rows, n_ctx=512), contract


@pytest.fixture(scope="module")
def setting(reference_gguf: Path, tiny_model_dir: Path) -> tuple[gate.Reference, ChatContract]:
    return _reference(reference_gguf, tiny_model_dir)


def _verify(path: Path, setting: tuple[gate.Reference, ChatContract]) -> dict[str, gate.Check]:
    reference, contract = setting
    report = gate.verify_file(path, "F16", reference, contract, "llama", reference.tensor_count, 512,
                              required_agreement=True)
    return {c.name: c for c in report.checks}


def test_the_untouched_export_passes_every_check(reference_gguf: Path,
                                                  setting: tuple[gate.Reference, ChatContract]) -> None:
    checks = _verify(reference_gguf, setting)
    assert {name: c.status for name, c in checks.items()} == {
        "architecture": "pass", "tensor count": "pass", "chat template": "pass", "special tokens": "pass",
        "tokenization": "pass", "added special tokens": "pass", "end-of-turn tokens": "pass",
        "greedy parity": "pass", "stops": "warn"}
    # random weights never end a turn: not the export's fault, so a warning and not a failure
    assert "did not end its turn" in checks["stops"].detail


@pytest.mark.parametrize(("planted", "changes", "drop", "caught_by", "says"), [
    ("no chat template", {}, ("tokenizer.chat_template",), "chat template", "missing"),
    ("wrong eos", {"tokenizer.ggml.eos_token_id": 1}, (), "special tokens", "eos id 1 ('<|im_start|>')"),
    ("tokenizer mismatch", {"tokenizer.ggml.pre": "llama3"}, (), "tokenization", "first difference at token"),
])
def test_each_planted_failure_is_caught(planted: str, changes: dict[str, object], drop: tuple[str, ...],
                                        caught_by: str, says: str, reference_gguf: Path, tmp_path: Path,
                                        setting: tuple[gate.Reference, ChatContract]) -> None:
    damaged = tmp_path / f"{planted.replace(' ', '-')}.gguf"
    gguf_meta.rewrite(reference_gguf, damaged, changes, drop)
    checks = _verify(damaged, setting)
    failed = {name for name, c in checks.items() if c.status == "fail"}
    assert failed == {caught_by}, {n: c.detail for n, c in checks.items()}
    assert says in checks[caught_by].detail


def test_a_gguf_that_is_not_the_merged_model_fails_greedy_parity(reference_gguf: Path, tiny_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    """The 16-bit reference's continuations are fed to the merged model: another model's weights (here the same
    shape, drawn again with a wide spread so that its choices are clear) pick other tokens, and the file fails."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-weights"
    torch.manual_seed(1)
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.5
    LlamaForCausalLM(config).save_pretrained(other, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model_dir / name, other / name)
    checks = _verify(reference_gguf, _reference(reference_gguf, other))
    failed = {name for name, c in checks.items() if c.status == "fail"}
    assert failed == {"greedy parity"}, {n: c.detail for n, c in checks.items()}
    assert "the merged model picks" in checks["greedy parity"].detail


def test_rewrite_refuses_a_field_the_file_lacks(reference_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(gguf_meta.GGUFError, match=r"no fields tokenizer\.ggml\.nonsense"):
        gguf_meta.rewrite(reference_gguf, tmp_path / "x.gguf", {"tokenizer.ggml.nonsense": 1})
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_the_header_reads_as_ggufs_own_reader_reads_it(reference_gguf: Path, tmp_path: Path) -> None:
    """Our header reader (fast: no numpy view per vocabulary entry) gives what the gguf package's reader gives,
    for a model and for a file with arrays of every kind it writes."""
    import gguf
    import numpy as np

    planted = tmp_path / "arrays.gguf"
    writer = gguf.GGUFWriter(str(planted), arch="llama")
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.floats", [0.5, 1.25])
    writer.add_array("test.strings", ["a", "\u00e9t\u00e9", ""])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_float64("test.double", 2.5)
    writer.add_bool("test.flag", True)
    writer.add_tensor("w", np.ones((2, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for path in (reference_gguf, planted):
        ours, theirs = gguf_meta.read(path), gguf.GGUFReader(str(path))
        plain = {name: f.contents() for name, f in theirs.fields.items() if not name.startswith("GGUF.")}
        assert ours.fields == {k: v for k, v in plain.items() if not isinstance(v, list)}
        arrays = {k: v for k, v in plain.items() if isinstance(v, list) and k not in gguf_meta.PER_TOKEN}
        nested = ("test.nested",)  # compared below: gguf's reader flattens an array of arrays
        assert {k: v for k, v in ours.arrays.items() if k not in nested} == \
            {k: v for k, v in arrays.items() if k not in nested}
        assert ours.tokens == plain.get("tokenizer.ggml.tokens", [])
        assert ours.tensor_types == [t.tensor_type.name for t in theirs.tensors]
        assert ours.tensor_count == len(theirs.tensors)
    assert gguf_meta.read(planted).arrays["test.nested"] == [[1, 2], [3]]


def test_a_truncated_file_is_reported_as_unreadable(reference_gguf: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(reference_gguf.read_bytes()[:4096])
    with pytest.raises(gguf_meta.GGUFError, match="not a readable GGUF file"):
        gguf_meta.read(cut)


def test_perplexity_matches_a_hand_computation(reference_gguf: Path) -> None:
    """llama.cpp's perplexity over known tokens equals exp(mean NLL) computed from its own logits."""
    import math

    import numpy as np

    ids = [1, 9690, 198, 2683, 359, 253, 5356, 2]
    trained = [False, False, False, True, True, True, True, True]
    with gate.loaded(reference_gguf, 64) as llm:
        ppl, answer = gate.perplexity(llm, [(ids, trained)])
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    nll = [math.log(np.exp(row - row.max()).sum()) + row.max() - row[nxt] for row, nxt in zip(logits, ids[1:],
                                                                                                  strict=True)]
    assert ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)
    assert answer == pytest.approx(math.exp(sum(nll[2:]) / len(nll[2:])), rel=1e-6)
