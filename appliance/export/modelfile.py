"""The chat contract for other runtimes: an Ollama Modelfile whose Go template writes the same turns as
the Jinja template the model was trained with (derived from the contract's turns, so it reproduces the
template exactly), and the command lines that serve an exported file with its own template."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.templating import ChatContract


def go_template(contract: ChatContract) -> str | None:
    """The Ollama TEMPLATE equivalent of the contract, or None when it cannot be expressed.

    Ollama passes the conversation as .Messages (the Modelfile's SYSTEM first when the conversation has no
    system message) and every system message as $.System. A template without a system role writes
    $.System into the first user turn. A lead the tokenizer adds itself (a BOS token) is left out: the
    runtime adds it when it tokenizes the prompt. Go templates cannot trim, so a template that strips
    contents (Llama 3, Gemma) is followed for contents without surrounding whitespace."""
    turns = contract.turns
    if turns is None:
        return None
    folded = contract.folded_system
    parts = ["" if contract.lead_added else contract.lead]
    if folded is not None:
        parts.append("{{ $folded := false }}")
    parts.append("{{ range $i, $_ := .Messages }}" if contract.final_answer is not None else "{{ range .Messages }}")
    branches = {role: turn.prefix + "{{ .Content }}" + turn.suffix for role, turn in turns.items()}
    if folded is not None:
        user = turns["user"]
        branches["user"] = (f"{user.prefix}{{{{ if and $.System (not $folded) }}}}{folded.prefix}{{{{ $.System }}}}"
                            f"{folded.suffix}{{{{ end }}}}{{{{ $folded = true }}}}{{{{ .Content }}}}{user.suffix}")
    if contract.final_answer is not None:
        answer = turns["assistant"]
        branches["assistant"] = (f"{{{{ if eq (len (slice $.Messages $i)) 1 }}}}{contract.final_answer}{{{{ else }}}}"
                                 f"{answer.prefix}{{{{ end }}}}{{{{ .Content }}}}{answer.suffix}")
    roles = [role for role in ("system", "user", "assistant") if role in branches]
    for i, role in enumerate(roles):
        parts.append(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{branches[role]}')
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
