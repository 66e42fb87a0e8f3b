"""Benchmark: coverage-guided fuzzing (atheris, libFuzzer) of every data reader and the recipe loader.

    .venv/bin/python bench/fuzz_readers.py                          # 60 s in all, split across targets
    .venv/bin/python bench/fuzz_readers.py --seconds 600 --only parquet,csv

Each target runs in its own process (libFuzzer takes the process over and exits at the end) for its
share of the time, with the appliance's modules instrumented for coverage, starting from a small
corpus of valid samples written here. A target reads a file holding the fuzzer's bytes the way
`appliance data prepare` does and checks the readers' promise: rows and precise problems, or an
error naming the file; everything a row holds can be written out as UTF-8 JSON. Anything else is a
crash: a Python exception other than ApplianceError/FileProblem, a broken promise, an input that
runs longer than --timeout seconds, or the process dying. Each distinct crash is written to
bench/fuzz-crashes/ (with its traceback beside it), and the script exits 1 when there is any. Once
fixed, a crash's input goes to tests/fuzz_crashes/, named after what it broke, where a test reads it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CRASHES = REPO / "bench" / "fuzz-crashes"
TARGETS = ("jsonl", "json", "csv", "tsv", "parquet", "inspect", "recipe")
MAX_LEN = 16384  # bytes of one input; the seeds are smaller


# -- the seed corpus -----------------------------------------------------------------------------


def seeds(target: str) -> list[bytes]:
    """Valid samples of each format (what mutation starts from), and a few near misses."""
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reset my VPN?"},
                         {"role": "assistant", "content": "Open the portal."}]}
    rows: list[dict[str, Any]] = [
        chat,
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"instruction": "Summarise", "input": "Printer jam", "output": "Jam."},
        {"prompt": "Disk full?", "completion": "Clean temp files."},
        {"text": "call me at +1 415 555 0100", "label": "phone", "output": {"name": "Ann", "n": [1, 2.5, None]}},
    ]
    lines = [json.dumps(r, ensure_ascii=ascii_only).encode() for r in rows for ascii_only in (True, False)]
    table = _sample_table()
    if target in ("jsonl", "inspect"):
        out = [b"\n".join(lines) + b"\n", b"\xef\xbb\xbf" + b"\r\n".join(lines[:3]), lines[0] + b"\n{broken\n[1]\n"]
        return out + ([table.encode()] if target == "inspect" else [])
    if target == "json":
        return [json.dumps(rows).encode(), json.dumps(rows, indent=2).encode(), json.dumps(chat).encode(),
                b"\n".join(lines)]
    if target in ("csv", "tsv"):
        delimiter = "," if target == "csv" else "\t"
        text = table if target == "csv" else table.replace(",", "\t")
        return [text.encode(), ("\ufeff" + text.replace("\n", "\r\n")).encode(),
                f'text{delimiter}label\n"a ""quoted""\nline"{delimiter}x\n'.encode()]
    if target == "parquet":
        return _parquet_seeds(rows)
    if target == "recipe":
        recipes = sorted((REPO / "appliance" / "train" / "recipes").glob("*.yaml"))
        return [p.read_bytes() for p in recipes] + [b"rank: 8\nmix: {run-1: 0.5}\ntarget_modules: [q_proj, v_proj]\n",
                                                    b"base: &b {rank: 4}\n<<: *b\nlearning_rate: 1e-4\n"]
    raise ValueError(target)


def _sample_table() -> str:
    from appliance.data.sample import shipped_path

    return "".join(shipped_path().read_text(encoding="utf-8").splitlines(keepends=True)[:12])


def _parquet_seeds(rows: list[dict[str, Any]]) -> list[bytes]:
    import datetime
    import io
    from decimal import Decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [
        pa.Table.from_pylist([{"text": r.get("text", "x"), "label": r.get("label", "y")} for r in rows]),
        pa.Table.from_pylist(rows[:1]),
        pa.table({"when": pa.array([datetime.datetime(2024, 1, 1), None]), "day": pa.array([datetime.date(2020, 2, 29),
                  None]), "amount": pa.array([Decimal("1.50"), None]), "blob": pa.array([b"\x00\xff", b"ok"]),
                  "n": pa.array([2**63, 0], pa.uint64()), "tags": pa.array([["a"], []])}),
    ]
    out = []
    for table in tables:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        out.append(buffer.getvalue())
    return out


# -- the child: one target under libFuzzer ----------------------------------------------------------


def target_function(target: str, path: Path) -> Callable[[], None]:
    """What one input goes through, asserting the promise; imported under instrumentation."""
    if target == "recipe":
        from appliance.cli import validated_settings
        from appliance.config import TrainConfig, load_settings

        def recipe() -> None:
            settings = load_settings(path)
            validated_settings(TrainConfig, {**settings, "store": "/tmp/store"}, settings.origins)

        return recipe
    if target == "inspect":
        from appliance.data.inspect import inspect_file, suggest

        def inspect() -> None:
            for suffix in (".jsonl", ".csv", ".json"):
                renamed = path.with_suffix(suffix)
                os.replace(path, renamed)
                try:
                    info = inspect_file(renamed, rows=20)
                    json.dumps({"file": info.as_dict(), "suggestion": suggest([info]).as_dict()}, ensure_ascii=False)
                finally:
                    os.replace(renamed, path)

        return inspect
    from appliance.data.readers import MAX_DEPTH, file_kind, read
    from appliance.data.schema import Problem

    def rows() -> None:
        kind = file_kind(path) if target == "json" else target
        for item in read(path, kind):
            assert item.file == str(path) and item.line >= 1
            if isinstance(item, Problem):
                assert item.reason
            else:
                json.dumps(item.data, ensure_ascii=False).encode("utf-8")
                assert _depth(item.data) <= MAX_DEPTH

    return rows


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def child(target: str, corpus: Path, crashes: Path, seconds: int, timeout: int) -> None:
    import atheris  # type: ignore[import-untyped]

    with atheris.instrument_imports(include=["appliance"]):
        from appliance.data.readers import FileProblem
        from appliance.errors import ApplianceError

        memory = Path("/dev/shm")  # inputs are written to a file per execution: keep that off the disk
        scratch = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-", dir=memory if memory.is_dir() else None))
        suffix = {"recipe": ".yaml", "inspect": ".jsonl"}.get(target, f".{target}")
        path = scratch / f"input{suffix}"
        run_one = target_function(target, path)
    seen: set[str] = set()

    def one_input(data: bytes) -> None:
        path.write_bytes(data)
        try:
            run_one()
        except (ApplianceError, FileProblem):
            pass
        except Exception as exc:  # noqa: BLE001 (any other exception is what this looks for: kept, then go on)
            _keep_crash(target, data, exc, crashes, seen)

    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", f"-timeout={timeout}", f"-max_len={MAX_LEN}",
                   "-rss_limit_mb=4096", "-print_final_stats=1", f"-artifact_prefix={crashes}/{target}-",
                   str(corpus)], one_input)
    atheris.Fuzz()


def _keep_crash(target: str, data: bytes, exc: Exception, crashes: Path, seen: set[str]) -> None:
    """One file per distinct crash (exception type and where it was raised), with its traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = next((f"{f.filename}:{f.lineno}" for f in reversed(frames) if "/appliance/" in f.filename),
                 f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?")
    signature = hashlib.sha256(f"{type(exc).__name__} {where}".encode()).hexdigest()[:12]
    if signature in seen:
        return
    seen.add(signature)
    crashes.mkdir(parents=True, exist_ok=True)
    (crashes / f"{target}-python-{signature}").write_bytes(data)
    (crashes / f"{target}-python-{signature}.txt").write_text(
        "".join(traceback.format_exception(exc)), encoding="utf-8")
    print(f"crash in {target}: {type(exc).__name__} at {where}", file=sys.stderr, flush=True)


# -- the parent: one child per target, then the table ----------------------------------------------


def measure(target: str, seconds: int, timeout: int, work: Path) -> dict[str, Any]:
    corpus = work / target
    corpus.mkdir(parents=True)
    for index, seed in enumerate(seeds(target)):
        (corpus / f"seed-{index}").write_bytes(seed)
    before = set(CRASHES.glob(f"{target}-*")) if CRASHES.is_dir() else set()
    started = time.monotonic()
    done = subprocess.run([sys.executable, __file__, "--child", target, str(corpus), str(CRASHES), str(seconds),
                           str(timeout)], cwd=REPO, capture_output=True, text=True, check=False,
                          timeout=seconds + 10 * timeout + 120)
    elapsed = time.monotonic() - started
    log = done.stderr
    executions = _last_int(r"stat::number_of_executed_units: (\d+)", log) or _last_int(r"Done (\d+) runs", log) \
        or _last_int(r"#(\d+)\s", log)
    found = sorted(p for p in set(CRASHES.glob(f"{target}-*")) - before if p.suffix != ".txt") \
        if CRASHES.is_dir() else []
    if done.returncode != 0 and not found:  # died without leaving an artifact: still a crash
        found = [Path(f"{target}: exit status {done.returncode}")]
        print(log[-3000:], file=sys.stderr)
    return {"target": target, "executions": executions or 0, "seconds": elapsed,
            "coverage": _last_int(r"cov: (\d+)", log) or 0, "crashes": found}


def _last_int(pattern: str, text: str) -> int | None:
    matches = re.findall(pattern, text)
    return int(matches[-1]) if matches else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time in all, split across the targets")
    parser.add_argument("--only", help=f"comma-separated targets among {', '.join(TARGETS)}")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take before it is a hang")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.child:
        target, corpus, crashes, seconds, timeout = args.child
        child(target, Path(corpus), Path(crashes), int(seconds), int(timeout))
        return
    targets = args.only.split(",") if args.only else list(TARGETS)
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {', '.join(sorted(unknown))}: choose from {', '.join(TARGETS)}")
    share = max(1, args.seconds // len(targets))
    CRASHES.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="fuzz-corpus-") as work:
        for target in targets:
            print(f"... fuzzing {target} for {share} s", file=sys.stderr, flush=True)
            results.append(measure(target, share, args.timeout, Path(work)))
    print(f"\n{'target':<9} {'executions':>11} {'seconds':>8} {'exec/s':>8} {'coverage':>9} {'crashes':>8}")
    for r in results:
        print(f"{r['target']:<9} {r['executions']:>11,} {r['seconds']:>8.1f} {r['executions'] / r['seconds']:>8,.0f} "
              f"{r['coverage']:>9} {len(r['crashes']):>8}")
    crashed = [c for r in results for c in r["crashes"]]
    print("\ncoverage: branches of the appliance's own (instrumented) code that the inputs reached; a crash is any "
          "error other than a precise one, a broken promise, a hang or a dead process")
    if crashed:
        print(f"\n{len(crashed)} crash(es), inputs in {CRASHES}:")
        for path in crashed:
            print(f"  {path}")
        sys.exit(1)


if __name__ == "__main__":
    main()
