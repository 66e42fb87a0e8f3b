"""The chat contract for other runtimes: an Ollama Modelfile whose Go template writes the same turns as
the Jinja template the model was trained with (derived from the contract's turns, so it reproduces the
template exactly), and the command lines that serve an exported file with its own template."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.templating import ChatContract


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
