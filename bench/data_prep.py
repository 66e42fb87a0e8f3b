"""Benchmark: data preparation throughput and peak memory, streaming vs loading into pandas.

    .venv/bin/python bench/data_prep.py                       # 10k and 100k rows, near-dup on 10k
    .venv/bin/python bench/data_prep.py --rows 10000 --near-dup-rows 10000 100000

Rows are generated IT-helpdesk tickets (the shipped sample's generator) with planted PII (names and
addresses too) and duplicates, as CSV. Each configuration runs in its own process so peak memory
(VmHWM) is its own. `appliance` runs validation + cleaning + PII redaction + exact dedup, with entity
recognition (names and addresses, the default) and without it (`--pii-entities ''`), and separately
near-dup embeddings; the peer does the same per-row work as the run without entity recognition after
loading the file with pandas, the way in-memory tools do. Streaming keeps memory flat as rows grow;
loading does not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LABELS = ["access", "billing", "hardware", "network", "security", "software"]




def _make_data(rows: int, folder: Path) -> Path:
    from appliance.data.sample import generate, to_csv

    path = folder / f"tickets-{rows}.csv"
    if not path.exists():
        path.write_text(to_csv(generate(rows=rows, seed=11)), encoding="utf-8")
    return path


def child(mode: str, path: Path, near_dup: bool, store: Path, entities: list[str]) -> None:
    """One measured run, printed as a JSON line."""
    from appliance import offline

    offline.activate()
    from appliance import events as ev
    from appliance.config import DataConfig
    from appliance.data import prepare
    from appliance.data.clean import clean_messages
    from appliance.data.dedup import exact_key
    from appliance.data.schema import Record
    from appliance.data.tasks import TaskSpec, check_messages, to_example
    from appliance.hardware import peak_rss_mb
    from appliance.pii import Redactor, find_pii

    baseline = peak_rss_mb()
    started = time.perf_counter()
    if mode == "appliance":
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = DataConfig(inputs=[str(path)], task="classification", text_field="text", label_field="category",
                             labels=LABELS, on_error="skip", near_dup=near_dup, templating=False, store=str(store),
                             pii_entities=entities)
            result = prepare.run(cfg, Path(run_dir), ev.Emitter(lambda e: None))
            kept = result.counts.train + result.counts.val + result.counts.test
    else:  # the peer: load everything, then the same per-row work
        import pandas as pd

        frame = pd.read_csv(path)
        spec = TaskSpec(task="classification", label_field="category", labels=LABELS)
        seen: set[int] = set()
        out = []
        for line, row in enumerate(frame.to_dict("records"), 2):
            example = to_example(Record(str(path), line, row), "table", spec)
            example.messages = clean_messages(example.messages)
            check_messages(example.messages)
            findings = [find_pii(m["content"]) for m in example.messages]
            key = exact_key(example.messages)
            if key in seen:
                continue
            seen.add(key)
            redactor = Redactor()
            example.messages = [{"role": m["role"], "content": redactor.redact(m["content"], f)}
                                for m, f in zip(example.messages, findings, strict=True)]
            out.append(example)
        kept = len(out)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_mb": peak_rss_mb(), "baseline_mb": baseline, "kept": kept}))


def measure(mode: str, path: Path, rows: int, near_dup: bool, store: Path, entities: str) -> dict[str, float]:
    code = [sys.executable, __file__, "--child", mode, str(path), "1" if near_dup else "0", str(store), entities]
    out = subprocess.run(code, capture_output=True, text=True, check=True, cwd=REPO).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    result["rows_per_s"] = rows / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--near-dup-rows", type=int, nargs="*", default=[10_000])
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, path, near, store, entities = args.child
        child(mode, Path(path), near == "1", Path(store), [e for e in entities.split(",") if e])
        return
    sys.path.insert(0, str(REPO))
    from appliance.store import Store

    store = Store.open().root  # the encoder is exported once into the project store and reused
    rows_table = []
    with tempfile.TemporaryDirectory() as tmp:
        plans = [(n, False, mode, entities) for n in args.rows
                 for mode, entities in (("appliance", ""), ("appliance", "names,addresses"), ("pandas peer", ""))]
        plans += [(n, True, "appliance", "") for n in args.near_dup_rows]
        for rows, near_dup, mode, entities in plans:
            path = _make_data(rows, Path(tmp))
            result = measure("appliance" if mode == "appliance" else "peer", path, rows, near_dup, store, entities)
            steps = ("+ near-dup" if near_dup else "validate, clean, PII, exact dedup"
                     + (" + names, addresses" if entities else ""))
            rows_table.append((mode, f"{rows:,}", steps, result))
            print(f"... {mode} {rows:,} rows ({steps}): {result['seconds']:.1f} s", file=sys.stderr)
    print(f"\n{'pipeline':<12} {'rows':>8}  {'steps':<54} {'rows/s':>8} {'peak MB':>8} {'over baseline':>13}")
    for mode, rows, steps, r in rows_table:
        print(f"{mode:<12} {rows:>8}  {steps:<54} {r['rows_per_s']:>8.0f} {r['peak_mb']:>8.0f} "
              f"{r['peak_mb'] - r['baseline_mb']:>13.0f}")


if __name__ == "__main__":
    main()
