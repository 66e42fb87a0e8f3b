"""`python -m appliance.train.rank RUN_DIR`: one process of a distributed training.

Started by `accelerate launch` (see distributed.py), with torchrun's RANK, WORLD_SIZE and friends
in its environment. Like a job's worker it turns the egress guard on first, writes its own events
(`ranks/rank-N.jsonl`, which the job's worker follows) and ends with `done` or one `error`. It
stops at the next step boundary when the job is cancelled (the worker leaves a stop file) or when
it gets SIGTERM, and dies with the launcher that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from pathlib import Path

from appliance import offline, unused


def main(argv: list[str]) -> int:
    from appliance.train.distributed import PEER_ENV, RANKS_DIR, SPEC_FILE, STOP_FILE, die_with_parent, rank_file

    die_with_parent()
    if len(argv) != 1:
        print("usage: python -m appliance.train.rank RUN_DIR (started by appliance train --processes N)",
              file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    spec = json.loads((run_dir / RANKS_DIR / SPEC_FILE).read_text(encoding="utf-8"))
    offline.activate(Path(spec["store"]) / "audit" / "egress.jsonl")
    if os.environ.get(PEER_ENV):
        offline.allow_peer(os.environ[PEER_ENV])
    unused.keep_out(unused.unused("train", spec))  # a distributed training is hf's

    from appliance import events as ev
    from appliance.config import TrainConfig
    from appliance.errors import ApplianceError, Cancelled
    from appliance.events import stop_on_signals
    from appliance.train import loop

    signalled = stop_on_signals()
    rank = int(os.environ.get("RANK", "0"))
    stop = run_dir / RANKS_DIR / STOP_FILE
    writer = ev.EventWriter(rank_file(run_dir, rank))
    emit = ev.Emitter(writer, lambda: signalled() or stop.exists())
    status = 1
    try:
        result = loop.run(TrainConfig.model_validate(spec), run_dir, emit)
        writer(ev.Done(result=result.model_dump(mode="json")))
        status = 0
    except Cancelled as exc:
        writer(ev.Error(title=exc.title, message=exc.message, hint=exc.hint))
        status = 130
    except ApplianceError as exc:
        writer(ev.Error(title=exc.title, message=exc.message, hint=exc.hint))
    except MemoryError:
        writer(ev.Error(title="Out of memory", message=f"rank {rank} ran out of memory",
                        hint="Lower the batch size or sequence length, or use fewer processes per machine."))
    except Exception as exc:  # noqa: BLE001 (the traceback goes to job.log, the summary to the job's stream)
        traceback.print_exc()
        writer(ev.Error(title="Unexpected error in training", message=f"{type(exc).__name__}: {exc}",
                        hint=f"The full traceback is in {run_dir / 'job.log'}."))
    finally:
        with contextlib.suppress(OSError):
            writer.close()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
