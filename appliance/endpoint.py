"""The endpoint as a process of its own, for whoever starts it: the TUI's Serve screen, a systemd unit.

`Endpoint.start` runs `appliance serve` as a child (in its own session, with its log beside the audit log),
with a fresh API key in an owner-only file when one is needed; `requests()` reads the audit log as it grows,
as typed records; `stop()` sends SIGTERM, which lets the answers in flight finish. `read_key_file` and
`systemd_unit` are what `appliance serve` uses for the same settings. No ML imports: the TUI loads this.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, ValidationError

from appliance.config import ServeConfig
from appliance.errors import ConfigError
from appliance.fields import validated
from appliance.store import Store

KEY_FILE = "serve-api-key"
LOG_FILE = "serve.log"


class AuditRecord(BaseModel):
    """One line of the serving audit log: a request, or the endpoint starting (`event` "start") or stopping."""

    model_config = ConfigDict(extra="allow")

    time: str = ""
    event: str | None = None  # "start" or "stop"; None for a request
    model: str | None = None
    model_sha256: str | None = None
    verified: bool | None = None
    client: str | None = None
    method: str | None = None
    path: str | None = None
    status: int | None = None
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None


def read_audit(path: Path, offset: int = 0) -> tuple[list[AuditRecord], int]:
    """The complete audit lines after byte `offset`, and the offset after them (a line still being written, or
    one that is not a record, is skipped)."""
    if not path.is_file():
        return [], offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    complete = data[: data.rfind(b"\n") + 1]
    records = []
    for line in complete.splitlines():
        try:
            records.append(AuditRecord.model_validate_json(line))
        except ValidationError:
            continue
    return records, offset + len(complete)


def read_key_file(path: Path) -> str:
    """The API key in `path`, which must be readable by its owner only and not empty."""
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


def new_key_file(store: Store) -> tuple[str, Path]:
    """A fresh random key in the store's owner-only keys folder (replacing the previous one)."""
    key = secrets.token_urlsafe(32)
    path = store.root / "keys" / KEY_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key + "\n")
    return key, path


@dataclass
class Endpoint:
    """`appliance serve` running as a child of this process."""

    process: subprocess.Popen[bytes]
    model: str
    host: str
    port: int
    key: str | None
    audit: Path
    offset: int  # where this endpoint's lines begin in the audit log
    _log: IO[bytes] | None = field(default=None, repr=False)

    @classmethod
    def start(cls, store: Store, model: str, host: str = "127.0.0.1", port: int = 8000,
              with_key: bool = False) -> Endpoint:
        """Start serving `model` (a run, an exported model's name or a .gguf path). Beyond loopback a key is
        required, as `appliance serve` requires one."""
        validated(ServeConfig, {"model": model, "host": host, "port": port, "api_key": "x" * 16 if with_key else None,
                                "store": str(store.root)})  # refused here as `appliance serve` would refuse it
        command = [sys.executable, "-m", "appliance", "--store", str(store.root), "serve", model, "--host", host,
                   "--port", str(port)]
        key = None
        if with_key:
            key, key_path = new_key_file(store)
            command += ["--api-key-file", str(key_path)]
        audit = store.serve_audit_log
        audit.parent.mkdir(parents=True, exist_ok=True)
        offset = audit.stat().st_size if audit.exists() else 0
        log = open(audit.parent / LOG_FILE, "ab")  # noqa: SIM115 (closed when the endpoint has stopped)
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        return cls(process=process, model=model, host=host, port=port, key=key, audit=audit, offset=offset,
                   _log=log)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def log_path(self) -> Path:
        return self.audit.parent / LOG_FILE

    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def requests(self) -> list[AuditRecord]:
        """The audit lines written since the last call (its start, its requests, its stop)."""
        records, self.offset = read_audit(self.audit, self.offset)
        return records

    def stop(self) -> None:
        """SIGTERM: the endpoint stops accepting and finishes the answers in flight."""
        if self.running():
            self.process.terminate()

    def close(self) -> None:
        """Forget the endpoint once it has stopped (its log file is closed)."""
        if self._log is not None and not self.running():
            self._log.close()
            self._log = None


def systemd_unit(cfg: ServeConfig, api_key_file: Path | None) -> str:
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
