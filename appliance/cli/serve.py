"""`appliance chat` and `appliance serve`: an exported model in the terminal and as a local endpoint."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from appliance.cli import JsonOpt, app, console, err_console, print_json, store, validated
from appliance.errors import ConfigError

ModelArg = Annotated[str, typer.Argument(help="A run id (its verified export), an exported model's name, or a "
                                              ".gguf path", show_default=False, metavar="MODEL")]
QuantOpt = Annotated[str | None, typer.Option(help="Which verified file of a run (default: the evaluation's "
                                                   "recommendation, else Q4_K_M)")]
CtxOpt = Annotated[int | None, typer.Option("--ctx", help="Context window in tokens (default: the model's, at "
                                                          "most 4096)")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads (default: all cores)")]
SystemOpt = Annotated[str | None, typer.Option(help="System prompt (default: the one the model was trained with)")]

CHAT_HELP = "/reset forgets the conversation, /system TEXT changes the system prompt, /exit (or Ctrl-D) leaves; " \
            "Ctrl-C stops an answer."


@app.command()
def chat(
    model: ModelArg,
    quant: QuantOpt = None,
    system: SystemOpt = None,
    temperature: Annotated[float, typer.Option(help="0 always picks the likeliest token")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass")] = 0.95,
    top_k: Annotated[int, typer.Option(help="Sample from this many likeliest tokens (0: all)")] = 40,
    repeat_penalty: Annotated[float, typer.Option(help="Penalty on repeating recent tokens")] = 1.1,
    max_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens")] = 512,
    seed: Annotated[int | None, typer.Option(help="Sampler seed, for repeatable answers")] = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    free: Annotated[bool, typer.Option("--free", help="Do not hold a classification model to its labels (or an "
                                                      "extraction model to its JSON schema)")] = False,
    message: Annotated[list[str] | None, typer.Option("--message", "-m", help="Ask this and exit instead of "
                                                      "chatting; repeat for a conversation")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Chat with an exported model in the terminal, streaming its answers, with the chat template and stop
    tokens it was trained with."""
    from appliance.config import Sampling
    from appliance.serve.chat import ChatSession
    from appliance.serve.model import resolve

    sampling = validated(Sampling, temperature=temperature, top_p=top_p, top_k=top_k,
                         repeat_penalty=repeat_penalty, max_tokens=max_tokens, seed=seed)
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
def serve(
    model: ModelArg,
    quant: QuantOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs an API key")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    api_key_file: Annotated[Path | None, typer.Option(help="File holding the API key clients must send as "
                                                           "'Authorization: Bearer KEY'")] = None,
    api_key: Annotated[str | None, typer.Option(help="The API key itself (visible to other users in the process "
                                                     "list: prefer --api-key-file)", envvar="APPLIANCE_API_KEY",
                                                show_envvar=True)] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(help="Browser origin allowed to call the endpoint; "
                                                              "repeat for more (default: none)")] = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens one answer may have (and the default)")] = 1024,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait while one is answered; more get 429")] = 8,
    max_body_kb: Annotated[int, typer.Option(help="Largest request body, in KiB")] = 1024,
    body_timeout: Annotated[float, typer.Option(help="Seconds a request body may take to arrive; slower ones "
                                                     "get 408")] = 30,
    system: SystemOpt = None,
    free: Annotated[bool, typer.Option("--free", help="Do not hold a classification model to its labels (or an "
                                                      "extraction model to its JSON schema)")] = False,
    log_prompts: Annotated[bool, typer.Option(help="Keep prompts and answers in the audit log, PII replaced by "
                                                   "placeholders")] = False,
    audit_log: Annotated[Path | None, typer.Option(help="Audit log file (default: <store>/audit/serve.jsonl)")]
    = None,
    shutdown_timeout: Annotated[int, typer.Option(help="Seconds SIGTERM waits for requests in flight")] = 30,
    print_systemd: Annotated[bool, typer.Option("--print-systemd", help="Print a systemd unit that runs this "
                                                                        "command, and exit")] = False,
) -> None:
    """Serve an exported model as an OpenAI-compatible endpoint (/v1/chat/completions, /v1/completions,
    /v1/models, /health), on loopback unless given an API key."""
    from appliance.config import ServeConfig, is_loopback
    from appliance.serve.model import resolve
    from appliance.serve.server import serve as run_server

    key = _read_key(api_key_file) if api_key_file is not None else api_key
    if key is None and not is_loopback(host):
        raise ConfigError(f"refusing to listen on {host} without an API key: anyone who can reach this machine "
                          "could use the model",
                          "Make a key file (umask 077; python -c 'import secrets; print(secrets.token_urlsafe(32))' "
                          "> key) and pass --api-key-file key, or listen on 127.0.0.1.")
    settings: dict[str, Any] = {
        "model": model, "quant": quant, "host": host, "port": port, "api_key": key,
        "cors_origins": cors_origin or [], "n_ctx": ctx, "threads": threads, "max_tokens": max_tokens,
        "max_queue": max_queue, "max_body_bytes": max_body_kb * 1024,
        "body_timeout_s": body_timeout, "system": system, "constrain": not free,
        "log_prompts": log_prompts, "audit_log": str(audit_log) if audit_log else None,
        "shutdown_timeout_s": shutdown_timeout, "store": str(store().root)}
    cfg = validated(ServeConfig, **settings)
    if print_systemd:
        sys.stdout.write(systemd_unit(cfg, api_key_file))
        return
    served = resolve(store(), cfg.model, cfg.quant)
    for note in served.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    run_server(cfg, served, lambda line: err_console.print(line, soft_wrap=True, highlight=False))


def _read_key(path: Path) -> str:
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the API key file {path}: {exc.strerror}",
                          "Create it with a long random key, readable by this user only.") from exc
    if path.stat().st_mode & 0o077:  # as ssh does with a private key: a shared secret is no secret
        raise ConfigError(f"the API key file {path} can be read by other users of this machine",
                          f"Restrict it with `chmod 600 {path}`; if others may have read it, make a new key.")
    if not key:
        raise ConfigError(f"the API key file {path} is empty", "Put a long random key in it "
                          "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE`).")
    return key


def systemd_unit(cfg: Any, api_key_file: Path | None) -> str:
    """A unit that runs `appliance serve` with these settings (the key stays in its file)."""
    argv = [str(Path(sys.executable).parent / "appliance"), "--store", cfg.store, "serve", cfg.model,
            "--host", cfg.host, "--port", str(cfg.port), "--max-tokens", str(cfg.max_tokens),
            "--max-queue", str(cfg.max_queue), "--shutdown-timeout", str(cfg.shutdown_timeout_s)]
    if cfg.quant:
        argv += ["--quant", cfg.quant]
    if api_key_file is not None:
        argv += ["--api-key-file", str(api_key_file.resolve())]
    if cfg.log_prompts:
        argv.append("--log-prompts")
    return "\n".join([
        "[Unit]",
        f"Description=appliance: {cfg.model} as an OpenAI-compatible endpoint",
        "After=network.target",
        "",
        "[Service]",
        f"User={os.environ.get('USER', 'appliance')}",
        f"WorkingDirectory={Path.cwd()}",
        f"ExecStart={shlex.join(argv)}",
        *(["# the API key: APPLIANCE_API_KEY=... in this file, readable by the service user only",
            "EnvironmentFile=/etc/appliance/serve.env"] if cfg.api_key is not None and api_key_file is None else []),
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={cfg.shutdown_timeout_s + 10}",
        "Restart=on-failure",
        "NoNewPrivileges=true",
        "PrivateTmp=true",
        "ProtectSystem=strict",
        f"ReadWritePaths={cfg.store}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])
