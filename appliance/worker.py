"""The child-process side of a job: `python -m appliance.worker JOB_DIR`.

Turns on the egress guard before anything else, runs the stage named in job.json with an
`Emitter` writing events.jsonl, and turns every way of failing into one `error` event. SIGTERM
and SIGINT set a cancel flag that the stage checks at its safe points.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import traceback
from pathlib import Path
from typing import Any

from appliance import offline, unused
from appliance.run import job_record  # light (no ML library): the guard goes on before any of those loads


def _resolve(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _warm_for(stage: str) -> contextlib.AbstractContextManager[None]:
    """An export converts with llama.cpp's converter: its process is forked here, while this one has computed
    nothing yet, with the converter's libraries imported once for both (toolchain.WarmConverter)."""
    if stage != "export":
        return contextlib.nullcontext()
    from appliance import toolchain

    return toolchain.warm_converter()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m appliance.worker JOB_DIR", file=sys.stderr)
        return 2
    job_dir = Path(argv[1])
    record = job_record(job_dir)
    if record is None:
        print(f"{job_dir} holds no job record to run", file=sys.stderr)
        return 2
    store_root = record.config.get("store")
    offline.activate(Path(store_root) / "audit" / "egress.jsonl" if store_root else None)
    unused.keep_out(unused.unused(record.stage, record.config))

    # Imported after the guard is on, so nothing below can reach the network.
    from appliance import events as ev
    from appliance.errors import ApplianceError, Cancelled, DiskFull, is_disk_full
    from appliance.jobs import DISK_FULL_STATUS, STAGES

    cancelled = ev.stop_on_signals()
    writer = ev.EventWriter(job_dir / ev.EVENTS_FILE)
    emit = ev.Emitter(writer, cancelled)
    stage = record.stage

    def last_word(error: ev.Error, status: int) -> int:
        """Record how the job ended; when even that cannot be written (a full disk), the exit status says it."""
        try:
            writer(error)
        except Exception as exc:  # noqa: BLE001 (nothing can be written: leave it to the status)
            return DISK_FULL_STATUS if is_disk_full(exc) else status
        return status

    try:
        config_path, run_path = STAGES[stage]
        config = _resolve(config_path).model_validate(record.config)
        with _warm_for(stage):
            result = _resolve(run_path)(config, job_dir, emit)
        payload = result.model_dump(mode="json") if hasattr(result, "model_dump") else dict(result)
        writer(ev.Done(result=payload))
        return 0
    except Cancelled as exc:
        return last_word(ev.Error(title=exc.title, message=exc.message, hint=exc.hint), 130)
    except ApplianceError as exc:
        return last_word(ev.Error(title=exc.title, message=exc.message, hint=exc.hint), 1)
    except MemoryError:
        return last_word(ev.Error(title="Out of memory", message=f"the {stage} job ran out of memory",
                                  hint="Lower the batch size or sequence length, or free memory."), 1)
    except Exception as exc:  # noqa: BLE001 (the last line of defence: the traceback goes to job.log)
        if is_disk_full(exc):
            where = getattr(exc, "filename", None) or store_root or job_dir
            return last_word(ev.Error(title=DiskFull.title, message=f"the {stage} job could not write ({exc})",
                                      hint=f"Free space on the disk that holds {where} (`df -h` shows it), then run "
                                           "it again: nothing half-written was kept."), DISK_FULL_STATUS)
        traceback.print_exc()
        return last_word(ev.Error(title=f"Unexpected error in {stage}", message=f"{type(exc).__name__}: {exc}",
                                  hint=f"The full traceback is in {job_dir / 'job.log'}."), 1)
    finally:
        with contextlib.suppress(OSError):  # a pending progress line that the full disk refused
            writer.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
