"""A conversation with an exported model, streamed chunk by chunk.

`ChatSession.send` is a generator: it yields the answer's text as llama.cpp produces it, and a
`Notice` when something happened that the user should see (older turns dropped to fit the
context window). The CLI prints what it yields; the TUI consumes the same generator from a worker
thread. `cancel()` may be called from any thread and stops the answer at the next chunk; what was
said so far stays in the history.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from appliance.config import Sampling
from appliance.serve.model import ServedModel, ServeError, formatter, grammar, load, prompt_tokens

# Room kept for the answer when older turns are dropped: the whole max_tokens, up to half the window.
ANSWER_SHARE = 0.5


@dataclass(frozen=True)
class Notice:
    message: str


@dataclass
class Turn:
    """What the last answer took."""

    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str | None  # "stop", "length", or None when cancelled
    cancelled: bool
    dropped_turns: int

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


class ChatSession:
    def __init__(self, model: ServedModel, llm: Any, sampling: Sampling | None = None, system: str | None = None,
                 constrain: bool = True) -> None:
        self.model = model
        self.llm = llm
        self.sampling = sampling or Sampling()
        self.system = system if system is not None else (model.contract.system if model.contract else None)
        self.history: list[dict[str, str]] = []
        self.last: Turn | None = None
        self.constrained = grammar(model) if constrain else None
        self._format = formatter(model, llm)
        self._cancel = threading.Event()

    @classmethod
    def open(cls, model: ServedModel, sampling: Sampling | None = None, system: str | None = None,
             constrain: bool = True, n_ctx: int | None = None, threads: int | None = None) -> ChatSession:
        return cls(model, load(model, n_ctx, threads), sampling, system, constrain)

    @property
    def n_ctx(self) -> int:
        return int(self.llm.n_ctx())

    def messages(self, user: str | None = None) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user}] if user is not None else []
        return head + self.history + tail

    def reset(self) -> None:
        self.history.clear()

    def cancel(self) -> None:
        self._cancel.set()

    def send(self, text: str) -> Iterator[str | Notice]:
        """Ask `text`; yields the answer in chunks (and notices), and records the exchange."""
        from llama_cpp import LlamaGrammar

        self._cancel.clear()
        dropped, prompt = self._fit(text)
        if dropped:
            which = "the oldest exchange" if dropped == 1 else f"the {dropped} oldest exchanges"
            yield Notice(f"dropped {which} to fit the {self.n_ctx}-token context window")
        sampling = self.sampling.model_dump()
        if self.constrained is not None:
            sampling["grammar"] = LlamaGrammar.from_string(self.constrained[0], verbose=False)
        started = time.monotonic()
        answer: list[str] = []
        finish: str | None = None
        stream = self.llm.create_chat_completion(messages=self.messages(text), stream=True, **sampling)
        try:
            for chunk in stream:
                if self._cancel.is_set():
                    break
                choice = chunk["choices"][0]
                piece = choice["delta"].get("content")
                if piece:
                    answer.append(piece)
                    yield piece
                finish = choice.get("finish_reason") or finish
        finally:
            stream.close()  # stops llama.cpp when the consumer went away or cancelled
            said = "".join(answer)
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": said}]
            cancelled = self._cancel.is_set() or finish is None
            tokens = len(self.llm.tokenize(said.encode("utf-8"), add_bos=False, special=True)) if said else 0
            self.last = Turn(prompt, tokens, round(time.monotonic() - started, 3), None if cancelled else finish,
                             cancelled, dropped)

    def ask(self, text: str) -> str:
        """The whole answer at once (notices are dropped)."""
        return "".join(piece for piece in self.send(text) if isinstance(piece, str))

    def _fit(self, text: str) -> tuple[int, int]:
        """Drop the oldest exchanges until the conversation and room for the answer fit the window."""
        reserve = min(self.sampling.max_tokens, int(self.n_ctx * ANSWER_SHARE))
        dropped = 0
        while True:
            needed = prompt_tokens(self.llm, self._format, self.messages(text))
            if needed + reserve <= self.n_ctx or len(self.history) < 2:
                break
            del self.history[:2]
            dropped += 1
        if needed >= self.n_ctx - 1:
            raise ServeError(f"the message needs {needed} tokens with the system prompt, and the context window "
                             f"holds {self.n_ctx}", "Shorten it, or start the chat with a larger --ctx.")
        return dropped, needed
