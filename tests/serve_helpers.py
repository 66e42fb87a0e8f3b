"""Helpers for the endpoint tests: `appliance serve` in its own process on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from appliance.store import Store

KEY = "test-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def key_file(folder: Path, key: str = KEY) -> Path:
    """A key file as an operator makes one: the key on one line, readable by its owner only."""
    path = folder / "key"
    path.write_text(key + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


class Server:
    """`appliance serve ARGS` on a free port, with its audit log at `audit` and its stdout and stderr
    in files beside it (a pipe nobody reads would stall a server that writes much)."""

    def __init__(self, store: Store, args: list[str], audit: Path) -> None:
        self.port = free_port()
        self.audit = audit
        self.stdout, self.stderr = audit.with_suffix(".stdout"), audit.with_suffix(".stderr")
        env = {**os.environ, "APPLIANCE_HOME": str(store.root)}
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "appliance", "serve", *args, "--port",
                                             str(self.port), "--audit-log", str(audit)], env=env, stdout=out,
                                            stderr=err, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.process.kill()
        raise AssertionError("the server did not answer /health within 180 s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=120)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.read_text(encoding="utf-8").splitlines()]

    def output(self) -> str:
        """What the server wrote to stdout and stderr so far."""
        return self.stdout.read_text(encoding="utf-8", errors="replace") + \
            self.stderr.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
