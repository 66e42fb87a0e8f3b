"""The verification gate: proof that each exported GGUF is the model that was trained.

For every file it checks what breaks fine-tunes after export in other tools:
- metadata, read from the file: architecture, tensor count, the chat template and the special
  token ids are those of the training tokenizer;
- tokenization: llama.cpp splits golden conversations (many scripts, emoji, code, whitespace
  runs, the template's special tokens) into exactly the ids the training tokenizer gives;
- greedy parity: the 16-bit reference GGUF's greedy continuations are fed to the merged model,
  run from its safetensors a module at a time (`streamed`: never a whole float32 copy), which must
  pick the same next token at every position (near-ties aside); every other file is measured
  against the reference's continuations;
- stopping: greedy generation ends on an end-of-turn token within a bound;
- perplexity on the run's validation split, and its change against the 16-bit reference.
A file that fails a required check is not registered as usable; the report says which and why.
The references (continuations, their margins, perplexity) come from llama.cpp on the 16-bit file, so
the gate's memory is the mapped GGUF and the largest float32 module, whatever the model's size.
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance import gguf_meta
from appliance.records import Check, FileReport
from appliance.templating import ChatContract

TIE_MARGIN = 0.05  # logits this close are a tie; float rounding may pick either token
STOP_BOUND = 256  # tokens within which greedy generation must end its turn
MAX_NEW = 32  # greedy tokens of the 16-bit reference per prompt
WARN_AGREEMENT = 0.9
WARN_PPL_INCREASE = 0.2

GOLDEN_TEXTS = [
    "Grüße aus München! Ça va? ¿Qué tal? Заявка №4521 закрыта. 東京の天気は晴れです。 مرحبا بالعالم। नमस्ते दुनिया",
    "Emoji: 👍🏽 👨‍👩‍👧‍👦 🇩🇪 ❤️‍🔥 ✅ — and a café's naïve résumé (e\u0301 combining).",
    "def total(xs: list[int]) -> int:\n\tif not xs:\n\t\treturn 0\n    return sum(x * 2 for x in xs)  # 1_000_000\n",
    "runs   of    spaces\t\ttabs\n\n\n\nnewlines \r\n and trailing   ",
    "Numbers 1234567890 3.14159 -42 1e-5 and URLs like http://intranet.local/a?b=c&d=e#f",
]


@dataclass
class Reference:
    """What the 16-bit reference GGUF says, computed once for all files, and how the merged model agreed."""

    source: Path  # the 16-bit GGUF the continuations come from
    continuations: list[tuple[list[int], list[int], list[float]]]  # prompt ids, greedy ids, top-2 margins
    golden_ids: list[list[int]]
    golden_texts: list[str]
    bos_probe: list[int]  # the tokenizer's ids for a short text with its special tokens added
    ppl_rows: list[tuple[list[int], list[bool]]]
    tensor_count: int
    merged_agreement: float  # share of continuation positions where the merged model picks the same token
    merged_misses: list[str]  # positions where it clearly picks another (not a near-tie)


def golden_conversations(contract: ChatContract) -> list[list[dict[str, str]]]:
    system = contract.system or "You are a careful assistant."
    return [
        [{"role": "system", "content": system}, {"role": "user", "content": GOLDEN_TEXTS[0]},
         {"role": "assistant", "content": GOLDEN_TEXTS[1]}, {"role": "user", "content": GOLDEN_TEXTS[2]}],
        [{"role": "user", "content": GOLDEN_TEXTS[3]}, {"role": "assistant", "content": GOLDEN_TEXTS[4]}],
        [{"role": "user", "content": f"Literal tokens {contract.eos_token} inside text."}],
    ]


def scored_rows(tokenizer: Any, conversations: list[list[dict[str, str]]],
                budget: int) -> list[tuple[list[int], list[bool]]]:
    """The validation rows whose tokens perplexity is measured on, in order, up to `budget` tokens."""
    from appliance.templating import encode

    rows: list[tuple[list[int], list[bool]]] = []
    used = 0
    for messages in conversations:
        ids, trained = encode(tokenizer, messages)
        if used + len(ids) > budget:
            break
        rows.append((ids, trained))
        used += len(ids)
    return rows


def build_reference(reference_gguf: Path, merged_dir: Path, tokenizer: Any, contract: ChatContract,
                    prompts: list[list[dict[str, str]]], ppl_rows: list[tuple[list[int], list[bool]]], n_ctx: int,
                    max_new: int = MAX_NEW) -> Reference:
    """Greedy continuations of the 16-bit GGUF through llama.cpp, checked against the merged model (run a
    module at a time in float32), and the tokenizer's golden ids."""
    from appliance import streamed
    from appliance.safetensors_meta import read_header

    encoded = [list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]) for messages in prompts]
    with loaded(reference_gguf, n_ctx) as llm:
        continuations = [(prompt, *_greedy(llm, prompt, max_new, contract.stop_ids)) for prompt in encoded]
    scored = [(p, g) for p, g, _m in continuations if g]
    merged = streamed.top2(merged_dir, [p + g for p, g in scored], [len(p) for p, _g in scored])
    agree = total = 0
    misses = []
    for n, ((_prompt, generated), picked) in enumerate(zip(scored, merged, strict=True)):
        for i, (want, pick, margin) in enumerate(zip(generated, picked.tokens, picked.margins, strict=True)):
            total += 1
            if pick == want:
                agree += 1
            elif margin > TIE_MARGIN:
                misses.append(f"prompt {n + 1}, token {i + 1}: the merged model picks {pick}, the GGUF {want} "
                              f"(margin {margin:.3f})")
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in golden_conversations(contract)] + GOLDEN_TEXTS
    golden = [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    tensors = sum(len(read_header(p)) for p in merged_dir.glob("*.safetensors")) + gguf_meta.generated_tensors(config)
    return Reference(source=reference_gguf, continuations=continuations, golden_ids=golden, golden_texts=texts,
                     bos_probe=list(tokenizer("hello")["input_ids"]), ppl_rows=ppl_rows, tensor_count=tensors,
                     merged_agreement=agree / total if total else 1.0, merged_misses=misses)


def _greedy(llm: Any, prompt: list[int], max_new: int, stop_ids: list[int]) -> tuple[list[int], list[float]]:
    """llama.cpp's greedy continuation of `prompt` (up to an end-of-turn token), with the margin between the
    two likeliest tokens at each step."""
    llm.reset()
    llm.eval(prompt)
    generated: list[int] = []
    margins: list[float] = []
    while len(generated) < max_new:
        logits = llm.scores[llm.n_tokens - 1]
        top = np.argpartition(logits, -2)[-2:]
        first, second = (top[0], top[1]) if logits[top[0]] >= logits[top[1]] else (top[1], top[0])
        generated.append(int(first))
        margins.append(float(logits[first] - logits[second]))
        if generated[-1] in stop_ids:
            break
        llm.eval([generated[-1]])
    return generated, margins


@contextmanager
def loaded(path: Path, n_ctx: int, lora: Path | None = None) -> Iterator[Any]:
    from appliance import offload, toolchain

    toolchain.preload_cuda()
    from llama_cpp import Llama

    threads = os.cpu_count() or 1  # llama-cpp-python's default is half the cores
    placed = offload.for_gguf(path, n_ctx)
    llm = Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True, verbose=False, seed=0,
                n_threads=threads, n_threads_batch=threads, lora_path=str(lora) if lora else None,
                **placed.llama_settings())
    try:
        yield llm
    finally:
        llm.close()


def check_metadata(info: gguf_meta.GGUFInfo, contract: ChatContract, architecture: str | None,
                   expected_tensors: int) -> list[Check]:
    checks = []
    arch_ok = info.architecture is not None and (architecture is None or info.architecture == architecture)
    known = "" if architecture else " (no expected architecture is known for this model class: only its presence " \
        "is checked)"
    checks.append(Check(name="architecture", status="pass" if arch_ok else "fail",
                        detail=f"{info.architecture}" + (known if arch_ok else f", expected {architecture}")))
    count_ok = info.tensor_count == expected_tensors
    checks.append(Check(name="tensor count", status="pass" if count_ok else "fail",
                        detail=f"{info.tensor_count}" + ("" if count_ok else f", expected {expected_tensors}")))
    if info.chat_template is None:
        checks.append(Check(name="chat template", status="fail", detail="missing: runtimes would fall back to a "
                            "generic template the model was not trained with"))
    elif info.chat_template != contract.template:
        checks.append(Check(name="chat template", status="fail", detail="differs from the template used in training"))
    else:
        checks.append(Check(name="chat template", status="pass", detail="identical to the training template"))
    problems = []
    if info.special_ids.get("eos") != contract.eos_id:
        problems.append(f"eos id {info.special_ids.get('eos')} ({info.token_text(info.special_ids.get('eos', -1))!r}), "
                        f"expected {contract.eos_id} ({contract.eos_token!r})")
    if contract.bos_id is not None and "bos" in info.special_ids and info.special_ids["bos"] != contract.bos_id:
        problems.append(f"bos id {info.special_ids['bos']}, expected {contract.bos_id}")
    for token, token_id in zip(contract.stop_tokens, contract.stop_ids, strict=True):
        if info.token_text(token_id) != token:
            problems.append(f"token {token_id} is {info.token_text(token_id)!r}, expected {token!r}")
    checks.append(Check(name="special tokens", status="fail" if problems else "pass",
                        detail="; ".join(problems) or f"eos {contract.eos_id} {contract.eos_token!r}, "
                        f"bos {contract.bos_id}, stops {contract.stop_ids}"))
    return checks


def check_tokenization(llm: Any, reference: Reference, contract: ChatContract) -> list[Check]:
    import llama_cpp

    form = contract.normalization  # llama.cpp does not normalize: the appliance's endpoint does it before it
    mismatches = []
    for text, expected in zip(reference.golden_texts, reference.golden_ids, strict=True):
        given = unicodedata.normalize(form, text) if form else text
        got = llm.tokenize(given.encode("utf-8"), add_bos=False, special=True)
        if list(got) != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                      min(len(got), len(expected)))
            mismatches.append(f"{text[:24]!r}...: first difference at token {at} "
                              f"({len(got)} vs {len(expected)} tokens)")
    note = (f" once put in {form}, as the tokenizer does first: llama.cpp alone does not normalize, the appliance's "
            "endpoint and chat do it before llama.cpp tokenizes (other runtimes split some accented text "
            "differently)") if form else ""
    checks = [Check(name="tokenization", status="fail" if mismatches else "pass",
                    detail="; ".join(mismatches) + note if mismatches
                    else f"{len(reference.golden_texts)} golden texts tokenize identically{note}")]
    with_special = list(llm.tokenize(b"hello", add_bos=True, special=False))
    same = with_special == reference.bos_probe
    checks.append(Check(name="added special tokens", status="pass" if same else "fail",
                        detail="llama.cpp adds the same leading tokens as the tokenizer" if same
                        else f"llama.cpp gives {with_special}, the tokenizer {reference.bos_probe}"))
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    not_eog = [t for t, i in zip(contract.stop_tokens, contract.stop_ids, strict=True)
               if not llama_cpp.llama_vocab_is_eog(vocab, i)]
    checks.append(Check(name="end-of-turn tokens", status="fail" if not_eog else "pass",
                        detail=f"llama.cpp would not stop on {', '.join(not_eog)}" if not_eog
                        else f"llama.cpp stops on {', '.join(contract.stop_tokens)}"))
    return checks


def agreement(llm: Any, reference: Reference) -> tuple[float, list[str]]:
    """Share of positions where llama.cpp's top token is the reference's greedy token, and the places
    where they differ although the reference's choice was clear (not a near-tie)."""
    agree = total = 0
    clear_misses = []
    for n, (prompt, generated, margins) in enumerate(reference.continuations):
        if not generated:
            continue
        llm.reset()
        llm.eval(prompt + generated[:-1])
        picks = np.argmax(llm.scores[len(prompt) - 1: len(prompt) - 1 + len(generated)], axis=-1)
        for i, (pick, want) in enumerate(zip(picks.tolist(), generated, strict=True)):
            total += 1
            if pick == want:
                agree += 1
            elif margins[i] > TIE_MARGIN:
                clear_misses.append(f"prompt {n + 1}, token {i + 1}: {pick} instead of {want} "
                                    f"(margin {margins[i]:.3f})")
    return (agree / total if total else 1.0), clear_misses


def check_stops(llm: Any, reference: Reference, stop_ids: list[int], bound: int = STOP_BOUND) -> Check:
    """Where the 16-bit reference ends its turn, the GGUF must end its turn too (within `bound`).

    Prompts on which the reference itself runs on (the merged model does the same: greedy parity) are
    not held against the export: that is the training's doing, and it is reported as a warning."""
    runaway, lengths, skipped = [], [], 0
    for n, (prompt, generated, _margins) in enumerate(reference.continuations):
        if not generated or generated[-1] not in stop_ids:
            skipped += 1
            continue
        llm.reset()
        out = llm.create_completion(prompt, max_tokens=bound, temperature=0.0, top_k=1)
        choice = out["choices"][0]
        lengths.append(out["usage"]["completion_tokens"])
        if choice["finish_reason"] != "stop":
            runaway.append(f"prompt {n + 1} ({choice['text'][:40]!r}...)")
    if runaway:
        return Check(name="stops", status="fail", detail=f"no end-of-turn within {bound} tokens on "
                     + ", ".join(runaway) + ", where the 16-bit reference ends its turn")
    if not lengths:
        return Check(name="stops", status="warn", detail="the model itself did not end its turn within "
                     f"{MAX_NEW} tokens on any prompt: train longer, or check that the data's answers end")
    note = f"; {skipped} prompt(s) where the reference runs past {MAX_NEW} tokens not checked" if skipped else ""
    return Check(name="stops", status="pass",
                 detail=f"ended its turn on all {len(lengths)} prompts where the 16-bit reference does "
                 f"(longest {max(lengths)} tokens){note}")


def perplexity(llm: Any, rows: list[tuple[list[int], list[bool]]]) -> tuple[float | None, float | None]:
    """Perplexity over all tokens and over the trained tokens of `rows`, with llama.cpp's logits."""
    all_nll = answer_nll = 0.0
    all_n = answer_n = 0
    for ids, trained in rows:
        if len(ids) < 2 or len(ids) > llm.n_ctx():
            continue
        llm.reset()
        llm.eval(ids)
        logits = llm.scores[: len(ids) - 1]
        top = logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(logits - top).sum(axis=-1, dtype=np.float64)) + top[:, 0]
        nll = log_norm - logits[np.arange(len(ids) - 1), ids[1:]].astype(np.float64)
        mask = np.asarray(trained[1:], dtype=bool)
        all_nll += float(nll.sum())
        all_n += len(nll)
        answer_nll += float(nll[mask].sum())
        answer_n += int(mask.sum())
    ppl = math.exp(all_nll / all_n) if all_n else None
    answer = math.exp(answer_nll / answer_n) if answer_n else None
    return ppl, answer


def verify_file(path: Path, quant: str, reference: Reference, contract: ChatContract, architecture: str | None,
                expected_tensors: int, n_ctx: int, required_agreement: bool,
                reference_ppl: float | None = None) -> FileReport:
    """Every check of the gate on one GGUF file."""
    from appliance.quants import count_types, fallback_note

    info = gguf_meta.read(path)
    report = FileReport(file=path.name, quant=quant, size_bytes=path.stat().st_size,
                        checks=check_metadata(info, contract, architecture, expected_tensors),
                        tensor_types=count_types(info.tensor_types))
    checks = report.checks  # the report's own list: the checks below are added to it
    report.note = fallback_note(report.tensor_types, quant) if quant in _quant_names() else None
    with loaded(path, n_ctx) as llm:
        checks.extend(check_tokenization(llm, reference, contract))
        if path.resolve() == reference.source.resolve():  # the reference itself: measured against the merged model
            rate, clear_misses, against = reference.merged_agreement, reference.merged_misses, "the merged model"
        else:
            rate, clear_misses = agreement(llm, reference)
            against = "the 16-bit reference"
        report.agreement = round(rate, 4)
        positions = sum(len(g) for _p, g, _m in reference.continuations)
        if required_agreement:
            checks.append(Check(name="greedy parity", status="fail" if clear_misses else "pass",
                                detail="; ".join(clear_misses[:3]) or f"same greedy tokens as {against} at "
                                f"{positions} positions of {len(reference.continuations)} prompts ({rate:.1%} "
                                "identical, the rest near-ties)"))
        else:
            checks.append(Check(name="greedy agreement", status="warn" if rate < WARN_AGREEMENT else "pass",
                                detail=f"{rate:.1%} of {positions} positions pick the 16-bit reference's token"))
        checks.append(check_stops(llm, reference, contract.stop_ids))
        report.ppl, report.answer_ppl = perplexity(llm, reference.ppl_rows)
    if reference_ppl and report.ppl:
        report.ppl_delta = round(report.ppl / reference_ppl - 1.0, 4)
        if report.ppl_delta > WARN_PPL_INCREASE:
            checks.append(Check(name="perplexity", status="warn", detail=f"{report.ppl_delta:+.1%} against the "
                                "16-bit reference: this quantization costs quality on your data"))
    return report


def verify_lora(adapter: Path, base: Path, reference: Reference, stop_ids: list[int],
                n_ctx: int) -> FileReport:
    """The adapter GGUF applied to the base GGUF must behave as the merged model does."""
    info = gguf_meta.read(adapter)
    kind = (info.fields.get("general.type"), info.fields.get("adapter.type"))
    checks = [Check(name="adapter metadata", status="pass" if kind == ("adapter", "lora") else "fail",
                    detail=f"general.type {kind[0]}, adapter.type {kind[1]}, alpha "
                    f"{info.fields.get('adapter.lora.alpha')}, {info.tensor_count} tensors")]
    report = FileReport(file=adapter.name, quant="LORA", size_bytes=adapter.stat().st_size, checks=checks,
                        tensor_types=_count(info.tensor_types))
    with loaded(base, n_ctx, lora=adapter) as llm:
        rate, _clear_misses = agreement(llm, reference)
        report.agreement = round(rate, 4)
        report.checks.append(Check(name="greedy agreement", status="warn" if rate < WARN_AGREEMENT else "pass",
                                   detail=f"base + adapter picks the 16-bit reference's token at {rate:.1%} of "
                                   "positions"))
        report.checks.append(check_stops(llm, reference, stop_ids))
    return report


def _count(types: list[str]) -> dict[str, int]:
    from appliance.quants import count_types

    return count_types(types)


def _quant_names() -> set[str]:
    from appliance.quants import QUANTS

    return set(QUANTS)
