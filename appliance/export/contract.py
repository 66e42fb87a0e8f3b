"""One chat-template contract from training to every runtime.

The template and end-of-turn tokens the model was trained with are read once from its tokenizer.
The GGUF carries the same Jinja template; the Ollama Modelfile gets the same turns as a Go
template, derived by rendering marked conversations through the Jinja template and checked to
reproduce it exactly; llama-server and `appliance serve` get command lines that use the GGUF's
own template. Models that stop where training taught them to, in every runtime.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel

# Tokens that end a turn in the common chat templates; whichever the tokenizer has is a stop token.
END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>",
                          "<|end_of_text|>", "<｜end▁of▁sentence｜>")
_MARK = {"system": "\x00SYS\x00", "user": "\x00USR\x00", "assistant": "\x00AST\x00"}


class Turn(BaseModel):
    prefix: str
    suffix: str


class ChatContract(BaseModel):
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

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = True) -> str:
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


def from_tokenizer(tokenizer: Any, system: str | None = None, task: str = "chat",
                   labels: list[str] | None = None) -> ChatContract:
    """The contract of the tokenizer the model was trained with."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template.strip():
        raise ValueError("the tokenizer has no chat template")
    eos = str(tokenizer.eos_token)
    vocab = tokenizer.get_vocab()
    stops = [eos] + [t for t in END_OF_TURN_CANDIDATES if t in vocab and t != eos and t in template]
    bos = tokenizer.bos_token
    turns, generation, default_system = _derive_turns(tokenizer)
    return ChatContract(
        template=template, eos_token=eos, eos_id=int(tokenizer.eos_token_id),
        bos_token=str(bos) if bos is not None else None,
        bos_id=int(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else None,
        stop_tokens=stops, stop_ids=[int(vocab[t]) for t in stops],
        turns=turns, generation_prompt=generation, default_system=default_system,
        system=system, task=task, labels=labels,
    )


def _render(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
    text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    return text


def _derive_turns(tokenizer: Any) -> tuple[dict[str, Turn] | None, str | None, str | None]:
    """Prefix and suffix of each role, the generation prompt and any injected system prompt.

    Rendering marked contents gives `lead S gap U gap A end`. Templates close every turn the
    same way, so the text after the last assistant content (`end`) is every role's suffix and
    the rest of each gap is the next role's prefix. The result must reproduce the Jinja template
    on sample conversations, or there are no turns (the template does something else)."""
    marked = [{"role": role, "content": mark} for role, mark in _MARK.items()]
    try:
        full = _render(tokenizer, marked, False)
        prompt = _render(tokenizer, marked[:2], True)
        no_system = _render(tokenizer, marked[1:], False)
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
        if check.render(sample, True) != _render(tokenizer, sample, True):
            return None, None, None
    return turns, generation, default_system


_SAMPLES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
     {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two?"}],
    [{"role": "user", "content": "a\n b"}, {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}],
]


def shared_system_prompt(rows: list[dict[str, Any]]) -> str | None:
    """The system prompt of the training rows when every row has the same one."""
    prompts = Counter(
        next((m["content"] for m in row.get("messages", []) if m.get("role") == "system"), None) for row in rows
    )
    if len(prompts) == 1:
        only = next(iter(prompts))
        return only if isinstance(only, str) else None
    return None


def go_template(contract: ChatContract) -> str | None:
    """The Ollama TEMPLATE equivalent of the contract, or None when it cannot be expressed."""
    if contract.turns is None:
        return None
    parts = ["{{ range .Messages }}"]
    for i, role in enumerate(("system", "user", "assistant")):
        turn = contract.turns[role]
        keyword = "if" if i == 0 else "else if"
        parts.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{turn.prefix}{{{{ .Content }}}}{turn.suffix}')
    parts.append("{{ end }}{{ end }}")
    parts.append(contract.generation_prompt or "")
    return "".join(parts)


def _quoted(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def modelfile(contract: ChatContract, gguf_name: str, num_ctx: int) -> str:
    """An Ollama Modelfile for `gguf_name` (in the same folder) that follows the contract."""
    lines = [f"FROM ./{gguf_name}"]
    template = go_template(contract)
    if template is not None:
        if '"""' in template:
            raise ValueError('the chat template contains """, which a Modelfile cannot quote')
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# The chat template is not a plain sequence of turns; Ollama reads it from the GGUF.")
    system = contract.system or contract.default_system
    if system:
        if '"""' in system:
            raise ValueError('the system prompt contains """, which a Modelfile cannot quote')
        lines.append(f'SYSTEM """{system}"""')
    for token in contract.stop_tokens:
        lines.append(f"PARAMETER stop {_quoted(token)}")
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    if contract.task in ("classification", "extraction"):
        lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def serve_commands(run_id: str, gguf_file: Path, template_file: Path, num_ctx: int, model_name: str) -> dict[str, str]:
    """The command lines that serve `gguf_file` with the contract's template."""
    return {
        "appliance": f"appliance serve {run_id} --host 127.0.0.1 --port 8000",
        "llama-server": (f"llama-server -m {gguf_file} --jinja --chat-template-file {template_file} "
                         f"-c {num_ctx} --host 127.0.0.1 --port 8080 --alias {model_name}"),
        "ollama": f"ollama create {model_name} -f {gguf_file.parent / 'Modelfile'} && ollama run {model_name}",
    }
