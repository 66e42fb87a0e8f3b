"""Named fault points, so tests and the chaos bench can fail a job at its worst moments, reproducibly.

Every stage calls `point(name)` just before each of its writes and at its step boundaries. It does
nothing unless APPLIANCE_FAULT asks for that point:

    APPLIANCE_FAULT=import.before_register          SIGKILL at the first pass (as the OOM killer would)
    APPLIANCE_FAULT=kill@train.step#3               SIGKILL at the third pass
    APPLIANCE_FAULT=full@train.checkpoint           from there on the disk is "full": RLIMIT_FSIZE drops
                                                    to zero, so the next write fails with EFBIG, in Python
                                                    and in native code alike
    APPLIANCE_FAULT=stop@train.checkpoint.register  SIGSTOP: frozen there, alive and holding its run's lock,
                                                    until someone sends SIGCONT or SIGKILL

APPLIANCE_FAULT_TRACE=FILE appends the name of every point passed, one per line: the chaos bench
records a stage's points once, then draws where to kill it from that list with a seeded generator.
"""

from __future__ import annotations

import os
import resource
import signal

ENV = "APPLIANCE_FAULT"
TRACE_ENV = "APPLIANCE_FAULT_TRACE"

_passes: dict[str, int] = {}


def parse(spec: str) -> tuple[str, str, int]:
    """`[kill@|full@|stop@]NAME[#N]` -> (action, name, nth pass)."""
    action, _, rest = spec.rpartition("@")
    name, _, nth = rest.partition("#")
    action = action or "kill"
    if action not in ("kill", "full", "stop") or not name or (nth and not nth.isdigit()):
        raise ValueError(f"{ENV}={spec!r}: expected [kill@|full@|stop@]NAME[#N]")
    return action, name, int(nth or 1)


def point(name: str) -> None:
    trace = os.environ.get(TRACE_ENV)
    if trace:
        with open(trace, "a", encoding="utf-8") as handle:
            handle.write(name + "\n")
    spec = os.environ.get(ENV)
    if not spec:
        return
    action, wanted, nth = parse(spec)
    if wanted != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
