"""The egress guard refuses anything beyond loopback, records it, and lets loopback through."""

from __future__ import annotations

import json
import os
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import offline
from appliance.errors import EgressBlocked


@pytest.fixture
def guard(tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "egress.jsonl"
    was_active = offline.is_active()
    offline.activate(log)
    yield log
    if not was_active:
        offline.deactivate()


def _echo_server(family: int, host: str) -> tuple[socket.socket, int]:
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        conn.sendall(conn.recv(16))
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_blocks_non_loopback_and_records_it(guard: Path) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(EgressBlocked) as excinfo:
        sock.connect(("10.255.255.1", 443))
    sock.close()
    assert "offline" in excinfo.value.message and excinfo.value.hint
    entry = json.loads(guard.read_text().splitlines()[-1])
    assert entry["event"] == "egress_blocked" and "10.255.255.1" in entry["address"]


def test_blocks_remote_names_before_any_dns_query(guard: Path) -> None:
    with pytest.raises(EgressBlocked):
        socket.getaddrinfo("huggingface.co", 443)
    with pytest.raises(EgressBlocked):
        urllib.request.urlopen("http://example.com/", timeout=5)


def test_blocks_udp_and_connect_ex_and_mapped_addresses(guard: Path) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(EgressBlocked):
        udp.sendto(b"x", ("8.8.8.8", 53))
    udp.close()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(EgressBlocked):
        tcp.connect_ex(("1.1.1.1", 80))
    tcp.close()
    assert not offline._is_local(("::ffff:10.0.0.1", 80, 0, 0), socket.AF_INET6)
    assert offline._is_local(("::ffff:127.0.0.1", 80, 0, 0), socket.AF_INET6)


def test_allows_loopback(guard: Path) -> None:
    server, port = _echo_server(socket.AF_INET, "127.0.0.1")
    with socket.create_connection(("localhost", port), timeout=5) as client:
        client.sendall(b"ping")
        assert client.recv(16) == b"ping"
    server.close()
    assert not guard.exists()  # nothing was refused


def test_allows_ipv6_loopback(guard: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        server, port = _echo_server(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("::1 is not configured")
    with socket.create_connection(("::1", port), timeout=5) as client:
        client.sendall(b"v6")
        assert client.recv(16) == b"v6"
    server.close()


def test_sets_offline_switches(guard: Path) -> None:
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
                "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK", "UNSLOTH_DISABLE_STATISTICS"):
        assert os.environ[key] == offline.OFFLINE_ENV[key]
