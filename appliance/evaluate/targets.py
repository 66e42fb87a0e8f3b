"""The models an evaluation asks: Hugging Face models (base, base + adapter, merged) through
transformers, and exported GGUF files through llama-cpp-python, behind one small interface.

- `score`: the log-likelihood of given answers (each label, with its end-of-turn token) after a
  prompt. Classification takes the most likely label, so a valid label always comes back, and only
  the answer positions are projected onto the vocabulary (never the logits of every position).
- `generate`: greedy answers, batched, capped at the tokens the task needs.
- `speed`: decoding tokens per second on this machine.
Both kinds take token ids made by the training tokenizer (the export gate proved llama.cpp
tokenizes identically), so every target reads exactly the same prompt.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

from appliance.modeling import AnswerScorer, shared_length

Message = dict[str, str]


class Target(Protocol):
    name: str
    runtime: str  # what runs it, as the report says: the library, the type and the device, or the file

    def score(self, prompt: list[int], answers: list[list[int]]) -> list[float]: ...

    def generate(self, prompts: list[list[int]], max_new: int, stop_ids: list[int]) -> list[list[int]]: ...

    def speed(self, prompt: list[int], tokens: int) -> float: ...

    def close(self) -> None: ...


def _float32_fits(model_dir: Path) -> bool:
    """Whether a float32 copy of the model takes at most half the memory available now (on the CPU, float32 is
    the exact and the fast type; a model too big for it runs in bfloat16, as it is stored)."""
    from appliance.hardware import memory
    from appliance.safetensors_meta import count_parameters

    parameters, _dtype = count_parameters(sorted(model_dir.glob("*.safetensors")))
    return 4 * parameters <= memory().available_mb * (1 << 20) // 2


def compute_device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class HFTarget:
    """A transformers model, optionally with a PEFT adapter on top."""

    def __init__(self, name: str, model_dir: Path, adapter_dir: Path | None = None, batch_size: int = 8) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.name = name
        self.device = compute_device()
        dtype = torch.float32 if self.device.type == "cpu" and _float32_fits(model_dir) else torch.bfloat16
        self.runtime = f"transformers, {str(dtype).removeprefix('torch.')} on {self.device.type}"
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(self.device)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
        self.model = model.eval()
        self.batch_size = batch_size
        self.scorer = AnswerScorer(self.model)

    def score(self, prompt: list[int], answers: list[list[int]]) -> list[float]:
        return self.scorer.score(prompt, answers)

    def generate(self, prompts: list[list[int]], max_new: int, stop_ids: list[int]) -> list[list[int]]:
        import torch

        out: list[list[int]] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            width = max(len(p) for p in chunk)
            pad = stop_ids[0]
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            with torch.no_grad():
                generated = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                                do_sample=False, pad_token_id=pad, eos_token_id=stop_ids)
            for row in generated[:, width:].tolist():
                out.append(_until_stop(row, stop_ids))
        return out

    def speed(self, prompt: list[int], tokens: int) -> float:
        import torch

        ids = torch.tensor([prompt], device=self.device)
        began = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                      min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        return float(out.shape[1] - len(prompt)) / (time.perf_counter() - began)

    def close(self) -> None:
        del self.model


class GGUFTarget:
    """An exported GGUF file, loaded once for every question. Logits are read for the last position
    only (never kept for every position), and prompts that share a prefix with the previous one
    (the system prompt, the few-shot examples) reuse its cache."""

    def __init__(self, name: str, path: Path, n_ctx: int) -> None:
        from appliance import offload, toolchain

        toolchain.preload_cuda()
        from llama_cpp import Llama

        self.name = name
        self.path = path
        placed = offload.for_gguf(path, n_ctx)
        self.runtime = f"llama.cpp, {path.name}" + (f", {placed.reason}" if placed.on_gpu else "")
        threads = os.cpu_count() or 1
        self.llm = Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), verbose=False, seed=0,
                         n_threads=threads, n_threads_batch=threads, **placed.llama_settings())

    def _feed(self, tokens: list[int]) -> None:
        """Make the cache hold exactly `tokens`, evaluating only what differs from what it holds."""
        llm = self.llm
        common = shared_length(llm.input_ids[: llm.n_tokens].tolist(), tokens)
        llm.n_tokens = min(common, len(tokens) - 1)  # the last token is evaluated again for its logits
        llm.eval(tokens[llm.n_tokens:])

    def _log_probs(self) -> Any:
        import numpy as np

        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),))
        logits = logits.astype(np.float64)
        top = logits.max()
        return logits - (np.log(np.exp(logits - top).sum()) + top)

    def score(self, prompt: list[int], answers: list[list[int]]) -> list[float]:
        self._feed(prompt)
        first = self._log_probs()
        scores = []
        for answer in answers:
            log_probs, total = first, 0.0
            self.llm.n_tokens = len(prompt)
            for i, token in enumerate(answer):
                total += float(log_probs[token])
                if i + 1 < len(answer):
                    self.llm.eval([token])
                    log_probs = self._log_probs()
            scores.append(total)
        self.llm.n_tokens = len(prompt)
        return scores

    def generate(self, prompts: list[list[int]], max_new: int, stop_ids: list[int]) -> list[list[int]]:
        import numpy as np

        out = []
        for prompt in prompts:
            self._feed(prompt)
            tokens: list[int] = []
            while len(tokens) < max_new:
                token = int(np.argmax(self._log_probs()))
                if token in stop_ids:
                    break
                tokens.append(token)
                self.llm.eval([token])
            out.append(tokens)
        return out

    def speed(self, prompt: list[int], tokens: int) -> float:
        import numpy as np

        began = time.perf_counter()
        self.llm.reset()
        self.llm.eval(prompt)
        for _ in range(tokens):
            self.llm.eval([int(np.argmax(self._log_probs()))])
        return tokens / (time.perf_counter() - began)

    def close(self) -> None:
        self.llm.close()


def _until_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens
