"""Chaos: kill -9 jobs at random points, over and over, and check that nothing is lost.

    .venv/bin/python bench/chaos.py [--rounds 8] [--seed 1] [--stages data,train,export] [--json]

A scratch store borrows the default model (SmolLM2-135M-Instruct, a link, not a copy). Each stage
first runs once undisturbed, recording the fault points it passes (APPLIANCE_FAULT_TRACE) and how
long it takes: that run is the reference. Then each round, drawn from a generator seeded with
`--seed` and the round number:

- picks a stage and a moment: either one of the fault points the stage passed (a pass drawn from
  the trace: "SIGKILL at the 3rd train.step") or a random time within its reference duration
  (which lands anywhere: inside the converter, the quantizer, a tokenizer, a write);
- runs the stage on a fresh copy of its inputs and sends SIGKILL there, to the whole job (the worker
  and any converter it started), as the kernel's OOM killer would;
- checks the run: every registered artifact complete and agreeing with its record
  (appliance.integrity.check_run);
- runs the stage again (training resumes from its last checkpoint), then checks that the run is
  consistent, the litter was swept, and the result is what the reference got: the same prepared
  data (sha256 of every split), the planned number of steps resumed from the last checkpoint that
  was complete when it died, the same exported files through the gate with a manifest that verifies.

It prints a table, one row per round, and the rounds survived with nothing lost. There is no peer:
the goal is every round. Exit status 1 when any round lost something.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "smollm2-135m-instruct"
TRAIN = {"max_steps": 6, "batch_size": 2, "max_seq_len": 128, "learning_rate": 5e-4, "eval_every": 100,
         "save_every": 2, "keep_checkpoints": 2, "rank": 8, "alpha": 16, "backend": "hf", "dtype": "float32",
         "task_eval_items": 0}
QUANTS = ["Q8_0"]


class Bench:
    def __init__(self, root: Path) -> None:
        from appliance import offline
        from appliance.store import Store

        default = Store.open()
        if not default.has_model(MODEL):
            sys.exit(f"the default model {MODEL} is not imported: run ./install.sh "
                     "(or appliance models import default)")
        self.store = Store.open(root / "store")
        os.symlink(default.model_dir(MODEL), self.store.model_dir(MODEL))
        offline.activate(self.store.egress_log)
        self.root = root
        self.reference: dict[str, dict[str, Any]] = {}

    # -- the stages, each on a fresh copy of what it needs ---------------------------------------

    def config(self, stage: str, resume: bool = False) -> Any:
        from appliance.config import DataConfig, ExportConfig, TrainConfig
        from appliance.data.sample import shipped_path

        if stage == "data":
            return DataConfig(inputs=[str(shipped_path())], task="classification", label_field="category",
                              near_dup=False, store=str(self.store.root))
        if stage == "train":
            return TrainConfig(store=str(self.store.root), resume=resume, **TRAIN)
        return ExportConfig(quants=QUANTS, ppl_tokens=256, store=str(self.store.root))

    def fresh(self, stage: str, name: str) -> Path:
        """A run holding what `stage` needs: nothing, prepared data, or prepared data and an adapter."""
        run_dir = self.store.runs_dir / name
        run_dir.mkdir()
        if stage in ("train", "export"):
            shutil.copytree(self.reference["data"]["run"] / "data", run_dir / "data")
        if stage == "export":
            shutil.copytree(self.reference["train"]["run"] / "adapter", run_dir / "adapter")
        return run_dir

    def run_reference(self, stage: str) -> None:
        from appliance import faults, jobs

        run_dir = self.fresh(stage, f"reference-{stage}")
        trace = self.root / f"trace-{stage}.txt"
        began = time.monotonic()
        done = jobs.start(stage, run_dir, self.config(stage), env={faults.TRACE_ENV: str(trace)}).wait()
        points = trace.read_text(encoding="utf-8").split()
        self.reference[stage] = {"run": run_dir, "seconds": time.monotonic() - began, "points": points,
                                 "result": done.result, "outcome": self.outcome(stage, run_dir, done.result)}
        print(f"... reference {stage}: {len(points)} fault points passed in {time.monotonic() - began:.1f} s",
              file=sys.stderr)

    def outcome(self, stage: str, run_dir: Path, result: dict[str, Any]) -> Any:
        """What must come out the same however often the stage was killed on the way."""
        if stage == "data":
            from appliance.run import Run

            report = Run.at(run_dir).require_data_report()
            return {name: out.sha256 for name, out in report.outputs.items()}
        if stage == "train":
            return result["steps"]
        return sorted((f["quant"], f["passed"]) for f in result["files"])

    # -- one round ---------------------------------------------------------------------------

    def round(self, number: int, rng: random.Random, stages: list[str]) -> dict[str, Any]:
        from appliance import faults, integrity, jobs, manifest
        from appliance.errors import ApplianceError

        stage = rng.choice(stages)
        reference = self.reference[stage]
        run_dir = self.fresh(stage, f"round-{number}-{stage}")
        env: dict[str, str] = {}
        if rng.random() < 0.5:
            index = rng.randrange(len(reference["points"]))
            name = reference["points"][index]
            nth = reference["points"][:index + 1].count(name)
            env[faults.ENV] = f"kill@{name}#{nth}"
            where, delay = f"{name} #{nth}", None
        else:
            delay = rng.uniform(0.5, reference["seconds"] * 0.95)
            where = f"at {delay:.1f} s"
        row: dict[str, Any] = {"round": number, "stage": stage, "where": where}
        began = time.monotonic()
        job = jobs.start(stage, run_dir, self.config(stage), env=env)
        if delay is not None:
            deadline = time.monotonic() + delay
            while job.running() and time.monotonic() < deadline:
                time.sleep(0.05)
            if job.running():
                os.killpg(job.pid, signal.SIGKILL)  # the worker and the converter it may have started
        try:
            job.wait()
            row["killed"] = False  # it finished before the kill time came
        except ApplianceError:
            row["killed"] = job.returncode == -signal.SIGKILL
        checkpoint_steps = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")
                                  if (p / "trainer_state.json").is_file()) if stage == "train" else []
        row["after_kill"] = integrity.check_run(run_dir)
        try:
            done = jobs.run(stage, run_dir, self.config(stage, resume=True))
            row["rerun"] = "ok"
            outcome = self.outcome(stage, run_dir, done.result)
        except ApplianceError as exc:
            row["rerun"], outcome = f"{exc.title}: {exc.message}", None
        row["after_rerun"] = integrity.check_run(run_dir) + [f"litter left: {p.name}"
                                                            for p in integrity.litter(run_dir)]
        lost = []
        if outcome != reference["outcome"]:
            lost.append(f"result {outcome!r} differs from the reference {reference['outcome']!r}")
        if stage == "train" and outcome is not None and row["killed"]:
            resumed = done.result.get("resumed_from")
            expected = checkpoint_steps[-1] if checkpoint_steps else None
            row["resumed_from"] = resumed
            if resumed != expected and not (run_dir / "adapter").is_dir() and expected is not None:
                lost.append(f"resumed from {resumed}, not the last complete checkpoint {expected}")
        if stage == "export" and outcome is not None:
            from appliance.run import Run

            report = manifest.verify(Run(self.store, run_dir))
            if not report.ok:
                lost.append(f"manifest: signature {report.signature}, changed {report.changed[:2]}, "
                            f"missing {report.missing[:2]}, unrecorded {report.unrecorded[:2]}")
        row["lost"] = lost
        row["survived"] = not (row["after_kill"] or row["after_rerun"] or lost or row["rerun"] != "ok")
        row["seconds"] = round(time.monotonic() - began, 1)
        shutil.rmtree(run_dir, ignore_errors=True)
        return row


def table(rows: list[dict[str, Any]]) -> str:
    head = ["round", "stage", "SIGKILL where", "killed", "consistent after kill", "rerun", "consistent after",
            "nothing lost", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(v) for v in (
            r["round"], r["stage"], r["where"], "yes" if r["killed"] else "finished first",
            "yes" if not r["after_kill"] else "; ".join(r["after_kill"])[:120],
            r["rerun"][:80], "yes" if not r["after_rerun"] else "; ".join(r["after_rerun"])[:120],
            "yes" if not r["lost"] else "; ".join(r["lost"])[:120], r["seconds"])) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stages", default="data,train,export")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    needed = {"data"} | ({"train"} if {"train", "export"} & set(stages) else set()) | set(stages)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp:
        bench = Bench(Path(tmp))
        for stage in ("data", "train", "export"):
            if stage in needed:
                bench.run_reference(stage)
        rows = []
        for number in range(1, args.rounds + 1):
            row = bench.round(number, random.Random(f"{args.seed}-{number}"), stages)
            print(f"... round {number}: {row['stage']} {row['where']}: "
                  f"{'survived' if row['survived'] else 'LOST SOMETHING'}", file=sys.stderr)
            rows.append(row)
        egress = bench.store.egress_log
        blocked = len(egress.read_text().splitlines()) if egress.is_file() else 0
    killed = sum(r["killed"] for r in rows)
    survived = sum(r["survived"] for r in rows)
    if args.json:
        print(json.dumps({"rounds": rows, "survived": survived, "killed": killed, "egress_blocked": blocked},
                         indent=2, default=str))
    else:
        print(table(rows))
        print()
        print(f"{survived}/{len(rows)} rounds survived with nothing lost ({killed} killed mid-job, "
              f"{len(rows) - killed} finished before their kill time); seed {args.seed}; "
              f"{time.monotonic() - began:.0f} s in all; egress attempts refused: {blocked}")
    return 0 if survived == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
