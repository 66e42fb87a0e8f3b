"""Chat templating, in one place: how a conversation is rendered and encoded, where a turn ends, and
the chat contract that carries the same template from training to every runtime.

Every stage that turns a conversation into tokens comes here: data preparation (lengths), training
(the trained-token mask), evaluation (prompts and candidate answers), export (the contract written
into verification.json, checked by the gate) and serving (the contract read back). The template is
always the base model's own, read from its tokenizer; transformers is imported only when a tokenizer
is loaded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

# Tokens that end a turn in the common chat templates; whichever the tokenizer has is a stop token.
END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>",
                          "<|end_of_text|>", "<｜end▁of▁sentence｜>")
_MARK = {"system": "\x00SYS\x00", "user": "\x00USR\x00", "assistant": "\x00AST\x00"}

Messages = list[dict[str, str]]


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
    assistant turn, its end-of-turn token included, so the model learns to stop."""
    full = render(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], True))
        end = len(render(tokenizer, messages[: i + 1], False))
        spans.append((start, end))
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
    tokens, the turns as plain text when the template is a sequence of turns, and the run's task."""

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

    def render(self, messages: Messages, generation_prompt: bool = True) -> str:
        """The prompt as the contract writes it (the Go template in the Modelfile does the same)."""
        if self.turns is None:
            raise ValueError("this template is not a plain sequence of turns")
        text = ""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            turn = self.turns["system"]
            text += turn.prefix + self.default_system + turn.suffix
        for message in messages:
            turn = self.turns[message["role"]]
            text += turn.prefix + message["content"] + turn.suffix
        return text + (self.generation_prompt or "") if generation_prompt else text


def contract(tokenizer: Any, system: str | None = None, task: str = "chat",
             labels: list[str] | None = None) -> ChatContract:
    """The contract of the tokenizer the model was trained with."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template.strip():
        raise ValueError("the tokenizer has no chat template")
    stops = stop_tokens(tokenizer)
    bos = tokenizer.bos_token
    turns, generation, default_system = _derive_turns(tokenizer)
    return ChatContract(
        template=template, eos_token=stops[0], eos_id=int(tokenizer.eos_token_id),
        bos_token=str(bos) if bos is not None else None,
        bos_id=int(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else None,
        stop_tokens=stops, stop_ids=[int(tokenizer.convert_tokens_to_ids(t)) for t in stops],
        turns=turns, generation_prompt=generation, default_system=default_system,
        system=system, task=task, labels=labels,
    )


def _derive_turns(tokenizer: Any) -> tuple[dict[str, Turn] | None, str | None, str | None]:
    """Prefix and suffix of each role, the generation prompt and any injected system prompt.

    Rendering marked contents gives `lead S gap U gap A end`. Templates close every turn the
    same way, so the text after the last assistant content (`end`) is every role's suffix and
    the rest of each gap is the next role's prefix. The result must reproduce the Jinja template
    on sample conversations, or there are no turns (the template does something else)."""
    marked = [{"role": role, "content": mark} for role, mark in _MARK.items()]
    try:
        full = render(tokenizer, marked, False)
        prompt = render(tokenizer, marked[:2], True)
        no_system = render(tokenizer, marked[1:], False)
        s_at, u_at, a_at = (full.index(_MARK[role]) for role in ("system", "user", "assistant"))
    except Exception:  # noqa: BLE001 (a template may refuse a conversation shape; then it has no turns)
        return None, None, None
    closing = full[a_at + len(_MARK["assistant"]):]
    gap_su = full[s_at + len(_MARK["system"]): u_at]
    gap_ua = full[u_at + len(_MARK["user"]): a_at]
    if not (s_at < u_at < a_at and gap_su.startswith(closing) and gap_ua.startswith(closing)):
        return None, None, None
    turns = {"system": Turn(prefix=full[:s_at], suffix=closing),
             "user": Turn(prefix=gap_su[len(closing):], suffix=closing),
             "assistant": Turn(prefix=gap_ua[len(closing):], suffix=closing)}
    before_reply = full[: u_at + len(_MARK["user"])] + closing
    if not prompt.startswith(before_reply):
        return None, None, None
    generation = prompt[len(before_reply):]
    injected = no_system[: no_system.index(_MARK["user"]) - len(turns["user"].prefix)]
    default_system = None
    if injected:
        head = turns["system"].prefix
        if not (injected.startswith(head) and injected.endswith(closing)):
            return None, None, None
        default_system = injected[len(head): len(injected) - len(closing)]
    check = ChatContract(template="", eos_token="", eos_id=0, bos_token=None, bos_id=None, stop_tokens=[],
                         stop_ids=[], turns=turns, generation_prompt=generation, default_system=default_system,
                         system=None)
    for sample in _SAMPLES:
        if check.render(sample, True) != render(tokenizer, sample, True):
            return None, None, None
    return turns, generation, default_system


_SAMPLES: list[Messages] = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
     {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two?"}],
    [{"role": "user", "content": "a\n b"}, {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}],
]
