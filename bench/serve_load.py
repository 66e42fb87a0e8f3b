"""Benchmark: our endpoint under concurrent load, against bare llama-cpp-python on the same GGUF.

    .venv/bin/python bench/serve_load.py [--model RUN|NAME|FILE.gguf] [--clients 1,4] [--requests 16]
                                         [--max-tokens 32] [--rounds 2] [--seconds 120] [--json]

Both servers run in turn on loopback (never at the same time, so they do not share the cores), on
the same file with the same context window: `appliance serve FILE --free --system ''` (so it
generates exactly what the bare server does: no grammar, no added system prompt) and
`python -m llama_cpp.server --model FILE --interrupt_requests False`. For each number of
concurrent clients, --requests chat completions (greedy, --max-tokens each) are sent; a pass stops
early after --seconds. Every request asks for the same answer length, so both do the same work and
the difference is our wrapper: auth, body and context checks, queue, audit log. The resident memory
of the server is read before and after each pass (a long pass is a soak test: it should not grow).

Without --model, the newest exported run in the store is used; export one first
(`appliance export --run RUN`) if there is none.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
KEY = "bench-key-0123456789abcdef"
QUESTIONS = ["The printer on floor 3 jams on every job.", "I cannot log in to the HR portal since Monday.",
             "The VPN disconnects every hour from home.", "I was charged twice for the same licence.",
             "My laptop fan is very loud and it overheats.", "Someone sent me a suspicious invoice link."]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(url: str, process: subprocess.Popen[bytes], headers: dict[str, str]) -> None:
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{url} did not come up within 180 s")


def _start(kind: str, gguf: Path, n_ctx: int, clients: int, audit: Path) -> tuple[subprocess.Popen[bytes], str,
                                                                                   dict[str, str]]:
    port = _port()
    if kind == "appliance":
        command = [sys.executable, "-m", "appliance", "serve", str(gguf), "--port", str(port), "--ctx", str(n_ctx),
                   "--free", "--system", "", "--max-queue", str(clients), "--audit-log", str(audit)]
        env = {**os.environ, "APPLIANCE_API_KEY": KEY}
        headers = {"Authorization": f"Bearer {KEY}"}
    else:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port",
                   str(port), "--n_ctx", str(n_ctx), "--interrupt_requests", "False",
                   "--n_threads", str(os.cpu_count() or 1)]
        env = dict(os.environ)
        headers = {}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    _wait(url, process, headers)
    return process, url, headers


async def _drive(url: str, headers: dict[str, str], clients: int, requests: int, max_tokens: int,
                 seconds: float) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    tokens = prompt = 0
    answers: dict[str, str] = {}
    queue = list(range(requests))
    deadline = time.monotonic() + seconds

    async def client(session: httpx.AsyncClient) -> None:
        nonlocal tokens, prompt
        while queue and time.monotonic() < deadline:
            number = queue.pop()
            body = {"model": "m", "temperature": 0, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": QUESTIONS[number % len(QUESTIONS)]}]}
            started = time.monotonic()
            try:
                reply = await session.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            if reply.status_code != 200:
                errors[str(reply.status_code)] = errors.get(str(reply.status_code), 0) + 1
                continue
            latencies.append(time.monotonic() - started)
            data = reply.json()
            tokens += int(data["usage"]["completion_tokens"])
            prompt += int(data["usage"]["prompt_tokens"])
            answers[body["messages"][0]["content"]] = data["choices"][0]["message"]["content"]

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=600) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    wall = time.monotonic() - started
    ordered = sorted(latencies)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return {"done": len(latencies), "errors": errors, "seconds": round(wall, 2), "answers": answers,
            "prompt_tokens": round(prompt / max(1, len(latencies)), 1),
            "requests_per_s": round(len(latencies) / wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "p50_s": round(quantile(0.50), 3), "p95_s": round(quantile(0.95), 3), "p99_s": round(quantile(0.99), 3),
            "mean_s": round(statistics.fmean(latencies), 3) if latencies else float("nan")}


def _rss_mib(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def _model(spec: str | None) -> Path:
    sys.path.insert(0, str(REPO))
    from appliance.run import exported_models
    from appliance.serve.model import resolve
    from appliance.store import Store

    store = Store.open()
    if spec is None:
        names = exported_models(store)
        if not names:
            raise SystemExit("no exported model in the store: run `appliance export --run RUN` first, or give --model")
        spec = max(names.items(), key=lambda item: item[1].id)[0]
    return resolve(store, spec).path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Run id, exported model name or .gguf (default: the newest export)")
    parser.add_argument("--clients", default="1,4", help="Concurrent clients, comma-separated (at most 32)")
    parser.add_argument("--requests", type=int, default=16, help="Requests per pass (at most 1000)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=120, help="Time limit of one pass (at most 600)")
    parser.add_argument("--rounds", type=int, default=2, help="Passes of each server, in alternating order")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    clients = [min(32, max(1, int(c))) for c in args.clients.split(",")]
    requests, seconds = min(1000, max(1, args.requests)), min(600.0, max(1.0, args.seconds))
    gguf = _model(args.model)
    servers = ("llama_cpp.server", "appliance")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            # alternate the order (A B, B A, ...) so drift of the machine does not favour one server
            for kind in servers if round_ % 2 == 0 else servers[::-1]:
                process, url, headers = _start(kind, gguf, args.ctx, max(clients), Path(tmp) / "audit.jsonl")
                try:
                    asyncio.run(_drive(url, headers, 1, 2, args.max_tokens, seconds))  # warm-up, not counted
                    for count in clients:
                        before = _rss_mib(process.pid)
                        result = asyncio.run(_drive(url, headers, count, requests, args.max_tokens, seconds))
                        rows.append({"server": kind, "round": round_ + 1, "clients": count, **result,
                                     "rss_before_mib": before, "rss_after_mib": _rss_mib(process.pid)})
                finally:
                    process.terminate()
                    process.wait(timeout=60)
    if args.json:
        print(json.dumps({"model": str(gguf), "rows": rows}, indent=2))
        return
    _table(gguf, rows, clients, requests, args)


def _table(gguf: Path, rows: list[dict[str, Any]], clients: list[int], requests: int, args: Any) -> None:
    print(f"{gguf.name}: {requests} chat completions per pass, {args.max_tokens} tokens each, greedy, "
          f"{os.cpu_count()} cores, {args.rounds} rounds")
    header = f"{'server':<18}{'round':>6}{'clients':>8}{'done':>6}{'errors':>8}{'prompt':>8}{'req/s':>8}" \
             f"{'tok/s':>8}{'p50 s':>8}{'p95 s':>8}{'p99 s':>8}{'RSS MiB':>16}"
    print(header)
    print("-" * len(header))
    for row in sorted(rows, key=lambda r: (r["clients"], r["server"], r["round"])):
        errors = sum(row["errors"].values())
        print(f"{row['server']:<18}{row['round']:>6}{row['clients']:>8}{row['done']:>6}{errors:>8}"
              f"{row['prompt_tokens']:>8.1f}{row['requests_per_s']:>8.2f}{row['tokens_per_s']:>8.1f}"
              f"{row['p50_s']:>8.2f}{row['p95_s']:>8.2f}{row['p99_s']:>8.2f}"
              f"{row['rss_before_mib']:>8.0f}{row['rss_after_mib']:>8.0f}")
    for count in clients:
        ours = [r for r in rows if r["server"] == "appliance" and r["clients"] == count]
        bare = [r for r in rows if r["server"] == "llama_cpp.server" and r["clients"] == count]
        same = sum(ours[0]["answers"].get(q) == a for q, a in bare[0]["answers"].items())
        p50 = statistics.median(r["p50_s"] for r in ours) / statistics.median(r["p50_s"] for r in bare) - 1
        speed = statistics.median(r["tokens_per_s"] for r in ours) / statistics.median(r["tokens_per_s"] for r in bare)
        print(f"{count} client(s): {same}/{len(bare[0]['answers'])} answers identical; median p50 {p50 * 100:+.1f}%, "
              f"median throughput {(speed - 1) * 100:+.1f}% against bare llama_cpp.server")

if __name__ == "__main__":
    main()
