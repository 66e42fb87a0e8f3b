"""Chat templating, in one place: how a conversation is rendered and encoded, where a turn ends, and
the chat contract that carries the same template from training to every runtime.

Every stage that turns a conversation into tokens comes here: data preparation (lengths), training
(the trained-token mask), evaluation (prompts and candidate answers), export (the contract written
into verification.json, checked by the gate) and serving (the contract read back). The template is
always the base model's own, read from its tokenizer; transformers is imported only when a tokenizer
is loaded.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

# Tokens that end a turn in the common chat templates; whichever the tokenizer has is a stop token.
END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>",
                          "<|end_of_text|>", "<｜end▁of▁sentence｜>")

Messages = list[dict[str, str]]
NormalForm = Literal["NFC", "NFKC", "NFD", "NFKD"]


def load_tokenizer(model_dir: Path) -> Any:
    """The tokenizer (with its chat template) of a model folder in Hugging Face layout."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def render(tokenizer: Any, messages: Messages, generation_prompt: bool) -> str:
    """The conversation as the model's chat template writes it."""
    text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return text


def trained_spans(tokenizer: Any, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of what the model learns to write: every
    assistant turn from its generation prompt up to its end-of-turn token included (the model learns to
    stop), and nothing after it (what a template writes after the turn, or at the conversation's end, is
    never generated)."""
    full = render(tokenizer, messages, False)
    stops = stop_tokens(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], True))
        alone = len(render(tokenizer, messages[: i + 1], False))  # may hold what only a last turn gets
        content = message["content"].strip()
        found = full.find(content, start) if content else -1
        after = found + len(content) if found >= 0 else start
        ends = [at + len(stop) for stop in stops if 0 <= (at := full.find(stop, after)) < alone]
        spans.append((start, min([*ends, alone, len(full)])))
    return full, spans


def encode(tokenizer: Any, messages: Messages) -> tuple[list[int], list[bool]]:
    """Token ids of the templated conversation and, per token, whether it is trained."""
    text, spans = trained_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = [any(s <= start < e for s, e in spans) for start, _end in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), trained


def prompt_ids(tokenizer: Any, conversation: Messages) -> list[int]:
    """The conversation rendered for the model's next turn, as token ids."""
    encoded = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)
    return list(encoded["input_ids"])


def answer_ids(tokenizer: Any, conversation: Messages, answer: str) -> list[int]:
    """The tokens the model writes for `answer` after the conversation, its end-of-turn included (as
    trained). Earlier assistant turns (few-shot examples) belong to the prompt, not to the answer."""
    prompt = prompt_ids(tokenizer, conversation)
    full = list(tokenizer.apply_chat_template([*conversation, {"role": "assistant", "content": answer}],
                                              return_dict=True)["input_ids"])
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template renders an answer differently from its generation prompt; "
                         "answers are scored after the prompt, so this template is not supported")
    tail = full[len(prompt):]
    stops = set(stop_ids(tokenizer))
    end = next((i for i, token in enumerate(tail) if token in stops), len(tail) - 1)
    return tail[: end + 1]  # up to the end of the turn: what follows it is never generated


def stop_tokens(tokenizer: Any) -> list[str]:
    """Where the model ends its turn, as its chat contract declares it: the end-of-sequence token and every
    end-of-turn token the template writes (what runtimes are told to stop on)."""
    eos = str(tokenizer.eos_token)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    return [eos] + [t for t in END_OF_TURN_CANDIDATES
                    if t != eos and t in template and token_id(tokenizer, t) is not None]


def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a generated answer: the contract's stop tokens, and any other end-of-turn token
    the vocabulary has (a model that ends its turn with one of them has answered too)."""
    ids = [int(tokenizer.eos_token_id)]
    for token in (*stop_tokens(tokenizer), *END_OF_TURN_CANDIDATES):
        found = token_id(tokenizer, token)
        if found is not None and found not in ids:
            ids.append(found)
    return ids


def token_id(tokenizer: Any, token: str) -> int | None:
    """The id of one vocabulary entry, None when the vocabulary lacks it (looked up alone: building the
    whole vocabulary as a dict takes tens of milliseconds, and answers are scored by the hundred)."""
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or tokenizer.convert_ids_to_tokens(int(found)) != token:
        return None  # an unknown token maps to the unknown token's id, which names another token
    return int(found)


def shared_system_prompt(rows: Iterable[Messages]) -> str | None:
    """The system prompt of the training rows when every row has the same one."""
    prompts = Counter(next((m["content"] for m in messages if m.get("role") == "system"), None) for messages in rows)
    if len(prompts) == 1:
        only = next(iter(prompts))
        return only if isinstance(only, str) else None
    return None


# -- the chat contract -------------------------------------------------------------------------


class Turn(BaseModel):
    prefix: str
    suffix: str


class ChatContract(BaseModel):
    """What every runtime needs to talk to the model as it was trained: its template, its special and stop
    tokens, the turns as plain text when the template is a sequence of turns, and the run's task.

    As plain text a conversation is `lead`, then each message as its role's prefix, content and suffix,
    then the generation prompt (or `end` when no answer is asked for). A template without a system role
    writes the system prompt into the first user turn, between `folded_system`'s prefix and suffix."""

    template: str
    eos_token: str
    eos_id: int
    bos_token: str | None
    bos_id: int | None
    stop_tokens: list[str]
    stop_ids: list[int]
    turns: dict[str, Turn] | None  # None when the template is not a plain sequence of turns
    generation_prompt: str | None
    default_system: str | None  # what the template puts in when a conversation has no system turn
    system: str | None  # the system prompt every training row shared, if they all did
    task: str = "chat"
    labels: list[str] | None = None
    lead: str = ""  # written once, before the first turn (a BOS token, mostly)
    lead_added: bool = False  # the tokenizer adds the lead itself when it encodes a text with its special tokens
    folded_system: Turn | None = None  # around the system prompt inside the first user turn (no system role)
    final_answer: str | None = None  # the assistant prefix of an answer that ends the conversation, if different
    end: str = ""  # written after the last turn when no answer is asked for
    trims: bool = False  # the template strips the whitespace around every content
    normalization: NormalForm | None = None  # the Unicode form the tokenizer puts text in before it splits it

    def render(self, messages: Messages, generation_prompt: bool = True) -> str:
        """The conversation as the template writes it (the Go template in the Modelfile does the same)."""
        if self.turns is None:
            raise ValueError("this template is not a plain sequence of turns")
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        folded = None
        if self.folded_system is not None and messages and messages[0]["role"] == "system":
            folded, messages = self._content(messages[0]), messages[1:]
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        text = self.lead
        for i, message in enumerate(messages):
            turn = self.turns[message["role"]]
            prefix, content = turn.prefix, self._content(message)
            if message["role"] == "assistant" and self.final_answer is not None and i == len(messages) - 1 > last_user:
                prefix = self.final_answer
            if folded is not None and self.folded_system is not None and message["role"] == "user":
                content, folded = self.folded_system.prefix + folded + self.folded_system.suffix + content, None
            text += prefix + content + turn.suffix
        return text + (self.generation_prompt or "") if generation_prompt else text + self.end

    def _content(self, message: dict[str, str]) -> str:
        return message["content"].strip() if self.trims else message["content"]


def contract(tokenizer: Any, system: str | None = None, task: str = "chat",
             labels: list[str] | None = None) -> ChatContract:
    """The contract of the tokenizer the model was trained with."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template.strip():
        raise ValueError("the tokenizer has no chat template")
    stops = stop_tokens(tokenizer)
    bos = tokenizer.bos_token
    shape = turn_shape(tokenizer) or {"turns": None, "generation_prompt": None, "default_system": None}
    return ChatContract(
        template=template, eos_token=stops[0], eos_id=int(tokenizer.eos_token_id),
        bos_token=str(bos) if bos is not None else None,
        bos_id=int(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else None,
        stop_tokens=stops, stop_ids=[int(tokenizer.convert_tokens_to_ids(t)) for t in stops],
        system=system, task=task, labels=labels, normalization=normalization(tokenizer), **shape,
    )


def normalization(tokenizer: Any) -> NormalForm | None:
    """The Unicode normal form the tokenizer brings text to before splitting it (Qwen's NFC), found by
    normalizing a probe: what the file declares is not always what transformers runs."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = getattr(backend, "normalizer", None)
    if normalizer is None:
        return None
    probe = "e\u0301\ufb01\u00e9"  # decomposed é, the fi ligature, composed é
    done = normalizer.normalize_str(probe)
    forms: tuple[NormalForm, ...] = ("NFC", "NFKC", "NFD", "NFKD")
    return next((form for form in forms if done == unicodedata.normalize(form, probe)
                 and done != probe), None)


def normalized(messages: Messages, form: NormalForm | None) -> Messages:
    """The messages with their text in the tokenizer's normal form (what a runtime that does not normalize,
    llama.cpp, must be given to split it as the model was trained)."""
    if form is None:
        return messages
    return [{**m, "content": unicodedata.normalize(form, m["content"])} if isinstance(m.get("content"), str) else m
            for m in messages]


def turn_shape(tokenizer: Any) -> dict[str, Any] | None:
    """The contract's plain-text turns, derived from the Jinja template, or None when the template is not a
    sequence of turns (it must reproduce the template on sample conversations).

    Marked conversations are rendered and cut at the marks. The text after a user content is the user's
    suffix, then the next role's prefix, the generation prompt or the end; the suffix is what all of them
    start with (never cut inside a special token). The text before the first content is the lead (and a
    system prompt the template injects) and the first prefix. A system mark that lands inside the first
    user turn is a folded system prompt."""
    try:
        shape = _shape(tokenizer)
    except Exception:  # noqa: BLE001 (a template may refuse a conversation shape; then it has no turns)
        return None
    if shape is None:
        return None
    check = ChatContract(template="", eos_token="", eos_id=0, bos_token=None, bos_id=None, stop_tokens=[],
                         stop_ids=[], system=None, **shape)
    for sample in _SAMPLES:
        for asked in (True, False):
            if check.render(sample, asked) != render(tokenizer, sample, asked):
                return None
    return shape


def _said(role: str, mark: str) -> dict[str, str]:
    return {"role": role, "content": mark}


def _shape(tokenizer: Any) -> dict[str, Any] | None:
    s, u1, a1, u2, a2 = (_said(r, f"\x00{n}\x00") for r, n in
                         (("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2"), ("assistant", "A2")))
    special = [str(t) for t in tokenizer.get_added_vocab()]
    full = render(tokenizer, [u1, a1, u2, a2], False)
    head, ua1, au, ua2, tail = _cut(full, [u1, a1, u2, a2])
    asked = _cut(render(tokenizer, [u1, a1, u2], True), [u1, a1, u2])[-1]
    unasked = _cut(render(tokenizer, [u1, a1, u2], False), [u1, a1, u2])[-1]
    answered = _cut(render(tokenizer, [u1, a1], True), [u1, a1])[-1]
    user_end = _common([ua1, ua2, asked, unasked], special)
    answer_end = _common([au, tail, answered], special)
    user, answer = au[len(answer_end):], ua1[len(user_end):]
    end, final = unasked[len(user_end):], ua2[len(user_end):]
    if tail[len(answer_end):] != end or not head.endswith(user):
        return None
    opening = head[: len(head) - len(user)]
    turns = {"user": Turn(prefix=user, suffix=user_end), "assistant": Turn(prefix=answer, suffix=answer_end)}
    shape: dict[str, Any] = {"turns": turns, "generation_prompt": asked[len(user_end):], "default_system": None,
                             "lead": opening, "end": end, "final_answer": final if final != answer else None,
                             "trims": _trims(tokenizer, u1["content"]), "lead_added": _lead_added(tokenizer, opening)}
    with_system = render(tokenizer, [s, u1, a1, u2], True)
    before, between = _cut(with_system, [s, u1, a1, u2])[:2]
    if before.startswith(opening + user):  # no system role: the prompt opens the first user turn
        shape["folded_system"] = Turn(prefix=before[len(opening + user):], suffix=between)
        return shape
    if not between.endswith(user):
        return None
    system_end = between[: len(between) - len(user)]
    injected = opening.startswith(before) and opening.endswith(system_end) and len(opening) > len(before)
    if injected:
        shape["default_system"] = opening[len(before): len(opening) - len(system_end)]
        shape["lead"] = ""
    elif not before.startswith(opening):
        return None
    turns["system"] = Turn(prefix=before[len(shape["lead"]):], suffix=system_end)
    return shape


def _cut(text: str, messages: Messages) -> list[str]:
    """The text between the messages' contents (which must appear in order): before the first, between each
    pair, after the last."""
    pieces, at = [], 0
    for message in messages:
        found = text.index(message["content"], at)
        pieces.append(text[at:found])
        at = found + len(message["content"])
    return [*pieces, text[at:]]


def _common(texts: list[str], special: list[str]) -> str:
    """What all the texts start with, short of a special token that it would cut in two."""
    cut = next((i for i, chars in enumerate(zip(*texts, strict=False)) if len(set(chars)) > 1), min(map(len, texts)))
    for text in texts:
        for token in special:
            for start in range(max(0, cut - len(token) + 1), cut):
                if text.startswith(token, start):
                    cut = start
                    break
    return texts[0][:cut]


def _trims(tokenizer: Any, mark: str) -> bool:
    """Whether the template strips the whitespace around a content."""
    return f" {mark}\n" not in render(tokenizer, [{"role": "user", "content": f" {mark}\n"}], True)


def _lead_added(tokenizer: Any, lead: str) -> bool:
    """Whether the tokenizer writes the lead itself when it encodes a text with its special tokens (a runtime
    that tokenizes the prompt that way must not be given it twice)."""
    if not lead:
        return False
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    added = list(tokenizer("x")["input_ids"])
    return added[: len(added) - len(plain)] == list(tokenizer(lead, add_special_tokens=False)["input_ids"])


_SAMPLES: list[Messages] = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
     {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two?"}],
    [{"role": "user", "content": "a\n b"}, {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}],
    [{"role": "system", "content": " Be kind. "}, {"role": "user", "content": " x\n"},
     {"role": "assistant", "content": "y "}, {"role": "user", "content": "z"}, {"role": "assistant", "content": "w"}],
]
