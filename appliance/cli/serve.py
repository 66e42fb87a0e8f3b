"""`appliance chat` and `appliance serve`: an exported model in the terminal and as a local endpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from appliance.cli import JsonOpt, app, console, err_console, print_json, store
from appliance.cli.options import Settings, config_options, field_help
from appliance.config import Sampling, ServeConfig, is_loopback
from appliance.endpoint import read_key_file, systemd_unit
from appliance.errors import ConfigError
from appliance.fields import validated

ModelArg = Annotated[str, typer.Argument(help="A run id (its verified export), an exported model's name, or a "
                                              ".gguf path", show_default=False, metavar="MODEL")]
FreeOpt = Annotated[bool, typer.Option("--free", help="Do not hold a classification model to its labels (or an "
                                                      "extraction model to its JSON schema)")]
CHAT_HELP = "/reset forgets the conversation, /system TEXT changes the system prompt, /exit (or Ctrl-D) leaves; " \
            "Ctrl-C stops an answer."


@app.command()
@config_options(Sampling, exclude=())
def chat(
    settings: Settings,
    model: ModelArg,
    quant: Annotated[str | None, typer.Option(help=field_help(ServeConfig, "quant"))] = None,
    system: Annotated[str | None, typer.Option(help="System prompt (default: the one the model was trained with)")]
    = None,
    ctx: Annotated[int | None, typer.Option("--ctx", help=field_help(ServeConfig, "n_ctx"))] = None,
    threads: Annotated[int | None, typer.Option(help=field_help(ServeConfig, "threads"))] = None,
    free: FreeOpt = False,
    message: Annotated[list[str] | None, typer.Option("--message", "-m", help="Ask this and exit instead of "
                                                      "chatting; repeat for a conversation")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Chat with an exported model in the terminal, streaming its answers, with the chat template and stop
    tokens it was trained with."""
    from appliance.serve.chat import ChatSession
    from appliance.serve.model import resolve

    sampling = validated(Sampling, settings)
    served = resolve(store(), model, quant)
    for note in served.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    session = ChatSession.open(served, sampling, system, constrain=not free, n_ctx=ctx, threads=threads)
    if message:
        _scripted(session, message, as_json)
        return
    if as_json:
        raise ConfigError("--json needs --message", "Give the questions with -m, or leave out --json to chat.")
    _interactive(session)


def _describe(session: Any) -> str:
    served = session.model
    parts = [served.name, served.quant or served.path.name, "verified" if served.verified else "not verified",
             f"{session.n_ctx}-token context"]
    if session.constrained:
        parts.append(f"answers held to its {session.constrained[1]}")
    return " · ".join(parts)


def _scripted(session: Any, messages: list[str], as_json: bool) -> None:
    from appliance.serve.chat import Notice

    turns: list[dict[str, Any]] = []
    for text in messages:
        answer, notices = [], []
        for piece in session.send(text):
            if isinstance(piece, Notice):
                notices.append(piece.message)
                if not as_json:
                    err_console.print(f"[yellow]{piece.message}[/]")
            else:
                answer.append(piece)
                if not as_json:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        if not as_json:
            sys.stdout.write("\n")
        last = session.last
        turns.append({"user": text, "assistant": "".join(answer), "notices": notices,
                      "prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                      "seconds": last.seconds, "finish_reason": last.finish_reason})
    if as_json:
        served = session.model
        print_json({"model": served.name, "file": str(served.path), "sha256": served.sha256,
                    "verified": served.verified, "constrained": session.constrained[1] if session.constrained
                    else None, "turns": turns})


def _interactive(session: Any) -> None:
    from rich.markup import escape

    from appliance.serve.chat import Notice

    console.print(f"[bold]{escape(_describe(session))}[/]")
    console.print(f"[dim]{CHAT_HELP}[/]")
    while True:
        try:
            text = console.input("[bold cyan]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            console.print("[dim]conversation forgotten[/]")
            continue
        if text.startswith("/system"):
            session.system = text.removeprefix("/system").strip() or None
            console.print(f"[dim]system prompt {'set' if session.system else 'removed'}[/]")
            continue
        if text.startswith("/"):
            console.print(f"[dim]{CHAT_HELP}[/]")
            continue
        console.print("[bold green]model>[/] ", end="")
        stream = session.send(text)
        try:
            for piece in stream:
                if isinstance(piece, Notice):
                    console.print(f"[yellow]({escape(piece.message)})[/]")
                    console.print("[bold green]model>[/] ", end="")
                else:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            session.cancel()
            stream.close()
        last = session.last
        sys.stdout.write("\n")
        if last is not None:
            state = "stopped" if last.cancelled else ("cut at max tokens" if last.finish_reason == "length" else "")
            console.print(f"[dim]{last.completion_tokens} tokens · {last.tokens_per_s:.0f} tokens/s"
                          f"{' · ' + state if state else ''}[/]")


@app.command()
@config_options(ServeConfig, exclude=("store", "api_key", "constrain"), arguments=("model",))
def serve(
    settings: Settings,
    api_key_file: Annotated[Path | None, typer.Option(help="File holding the API key clients must send as "
                                                           "'Authorization: Bearer KEY' (owner-only)")] = None,
    api_key: Annotated[str | None, typer.Option(help="The API key itself (visible to other users in the process "
                                                     "list: prefer --api-key-file)", envvar="APPLIANCE_API_KEY",
                                                show_envvar=True)] = None,
    free: FreeOpt = False,
    print_systemd: Annotated[bool, typer.Option("--print-systemd", help="Print a systemd unit that runs this "
                                                                        "command, and exit")] = False,
) -> None:
    """Serve an exported model as an OpenAI-compatible endpoint (/v1/chat/completions, /v1/completions,
    /v1/models, /health), on loopback unless given an API key."""
    from appliance.serve.model import resolve
    from appliance.serve.server import serve as run_server

    key = read_key_file(api_key_file) if api_key_file is not None else api_key
    host = str(settings.get("host") or "127.0.0.1")
    if key is None and not is_loopback(host):
        raise ConfigError(f"refusing to listen on {host} without an API key: anyone who can reach this machine "
                          "could use the model",
                          "Make a key file (umask 077; python -c 'import secrets; print(secrets.token_urlsafe(32))' "
                          "> key) and pass --api-key-file key, or listen on 127.0.0.1.")
    cfg = validated(ServeConfig, {**settings, "api_key": key, "constrain": not free, "store": str(store().root)})
    if print_systemd:
        sys.stdout.write(systemd_unit(cfg, api_key_file))
        return
    served = resolve(store(), cfg.model, cfg.quant)
    for note in served.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    run_server(cfg, served, lambda line: err_console.print(line, soft_wrap=True, highlight=False))
