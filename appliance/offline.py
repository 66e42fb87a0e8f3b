"""The egress guard: nothing the appliance runs may reach beyond this machine.

`activate()` runs first in every CLI command and every child job, before any ML library is
imported. It sets the switches that the libraries we use read to stay offline, and replaces the
socket layer's connect and name-lookup functions with versions that allow only loopback and
Unix sockets (a DNS query for a remote name is traffic too). A
refused attempt raises `EgressBlocked` and is recorded in an audit log (one JSON line per attempt).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.errors import EgressBlocked

# Every switch that a library in our stack reads to stay offline or to stop reporting home.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "UNSLOTH_DISABLE_AUTO_UPDATES": "1",
    "WANDB_MODE": "disabled",
    "WANDB_DISABLED": "true",
    "COMET_MODE": "disabled",
    "MLFLOW_TRACKING_URI": "",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
    "PIP_NO_INDEX": "1",
}

_lock = threading.Lock()
_state: dict[str, Any] = {"active": False, "log": None, "originals": None, "peers": set()}


def _is_local(address: Any, family: int) -> bool:
    """True for loopback IP addresses and for Unix sockets (which never leave the machine)."""
    if family == getattr(socket, "AF_UNIX", -1):
        return True
    host = address[0] if isinstance(address, tuple) and address else address
    if not isinstance(host, str):
        return False
    host = host.split("%", 1)[0]  # IPv6 scope id
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # an unresolved host name: resolving it would already leak a DNS query
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or str(ip) in _state["peers"]


def _local_name(host: Any) -> bool:
    """Host names that resolve without asking a DNS server: numeric addresses, localhost, us."""
    if host is None or isinstance(host, bytes | bytearray):
        host = host.decode() if host else None
    if host is None or host in ("localhost", "", socket.gethostname()) or str(host).endswith(".localhost"):
        return True
    if str(host) in _state["peers"]:
        return True  # the cluster peer named by the user: its lookup is allowed, and each address it has
    try:
        ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    return True  # a numeric address: resolving it sends nothing; connect() checks it


def _record(address: Any, family: int) -> None:
    log_path: Path | None = _state["log"]
    if log_path is None:
        return
    entry = {
        "t": time.time(),
        "event": "egress_blocked",
        "address": repr(address),
        "family": int(family),
        "pid": os.getpid(),
    }
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
    except OSError:
        pass  # auditing must never turn a refusal into a crash; the refusal itself still stands


def _refuse(address: Any, family: int, what: str) -> EgressBlocked:
    _record(address, family)
    return EgressBlocked(
        f"refused {what} {address!r}: the appliance works offline",
        "Nothing here needs the network. If a library tried to download something, "
        "import the model or data into the store first (appliance models import).",
    )


def _check(sock: socket.socket, address: Any) -> None:
    if not _is_local(address, sock.family):
        raise _refuse(address, sock.family, "a connection to")


def activate(audit_log: Path | None = None) -> None:
    """Turn the guard on for this process (idempotent). Call before importing ML libraries."""
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value
    with _lock:
        if audit_log is not None:
            _state["log"] = Path(audit_log)
        if _state["active"]:
            return
        original_connect = socket.socket.connect
        original_connect_ex = socket.socket.connect_ex
        original_sendto = socket.socket.sendto
        original_getaddrinfo = socket.getaddrinfo

        def guarded_connect(self: socket.socket, address: Any) -> None:
            _check(self, address)
            original_connect(self, address)

        def guarded_connect_ex(self: socket.socket, address: Any) -> int:
            _check(self, address)
            return original_connect_ex(self, address)

        def guarded_sendto(self: socket.socket, data: Any, *args: Any) -> int:
            # sendto(data, address) or sendto(data, flags, address)
            _check(self, args[-1])
            return original_sendto(self, data, *args)  # type: ignore[arg-type]

        def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            # A DNS query for a remote name is itself traffic leaving the machine.
            if not _local_name(host):
                raise _refuse(host, 0, "a name lookup of")
            return original_getaddrinfo(host, *args, **kwargs)

        _state["originals"] = (original_connect, original_connect_ex, original_sendto,
                               original_getaddrinfo)
        socket.socket.connect = guarded_connect  # type: ignore[method-assign,assignment]
        socket.socket.connect_ex = guarded_connect_ex  # type: ignore[method-assign,assignment]
        socket.socket.sendto = guarded_sendto  # type: ignore[method-assign,assignment]
        socket.getaddrinfo = guarded_getaddrinfo
        _state["active"] = True


def allow_peer(host: str) -> None:
    """Let this process reach `host`, the main node of a training that spans machines (named by the user
    with --main-address), and nothing else beyond loopback. A name is resolved here, once, and every
    address it has is allowed; the permission is recorded in the audit log."""
    peers: set[str] = _state["peers"]
    peers.add(host)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        lookup = _state["originals"][3] if _state["originals"] else socket.getaddrinfo
        with contextlib.suppress(OSError):  # an unknown name: the connection fails on its own, and says so
            peers.update(str(info[4][0]) for info in lookup(host, None))
    log_path: Path | None = _state["log"]
    if log_path is not None:
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"t": time.time(), "event": "peer_allowed", "host": host,
                                         "addresses": sorted(peers), "pid": os.getpid()}) + "\n")
        except OSError:
            pass


def deactivate() -> None:
    """Restore the original socket functions (for tests of the guard itself)."""
    with _lock:
        originals: tuple[Callable[..., Any], ...] | None = _state["originals"]
        if not _state["active"] or originals is None:
            return
        connect, connect_ex, sendto, getaddrinfo = originals
        socket.socket.connect = connect  # type: ignore[method-assign]
        socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
        socket.socket.sendto = sendto  # type: ignore[method-assign]
        socket.getaddrinfo = getaddrinfo
        _state["active"] = False


def is_active() -> bool:
    return bool(_state["active"])


def audit_log_path() -> Path | None:
    log: Path | None = _state["log"]
    return log
