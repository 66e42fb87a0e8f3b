"""Named fault points, so tests can kill a job at its worst moment, deterministically.

`point("import.before_register")` does nothing unless APPLIANCE_FAULT names that point; then the
process kills itself with SIGKILL, exactly as the kernel's OOM killer would.
"""

from __future__ import annotations

import os
import signal

ENV = "APPLIANCE_FAULT"


def point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
