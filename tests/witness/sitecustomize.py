"""An independent witness for tests: with APPLIANCE_WITNESS=FILE (and this folder on PYTHONPATH), every
Python process of the appliance records, through the interpreter's audit hooks (PEP 578), each socket
connection, send and name lookup that reaches the socket layer, and each file it opens whose name says
pickle. The egress guard records what it refuses; this records what got past it, so a test can prove
that nothing did."""

from __future__ import annotations

import json
import os
import sys

_PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_path = os.environ.get("APPLIANCE_WITNESS")

if _path:
    _fd = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _write(entry: dict[str, object]) -> None:
        os.write(_fd, (json.dumps({"pid": os.getpid(), **entry}, default=repr) + "\n").encode())

    def _hook(event: str, args: tuple[object, ...]) -> None:
        if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
            sock, address = args[0], args[1]
            _write({"event": event, "family": int(getattr(sock, "family", -1)), "address": repr(address)})
        elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
            _write({"event": event, "host": repr(args[0])})
        elif event == "open" and args and isinstance(args[0], str | bytes):
            name = os.fsdecode(args[0])
            mode, flags = (*args, None, 0)[1:3]
            reading = ("r" in mode or "+" in mode) if isinstance(mode, str) else \
                (int(flags or 0) & os.O_ACCMODE) != os.O_WRONLY
            if name.lower().endswith(_PICKLES) and reading:
                _write({"event": "open", "path": name})

    _write({"event": "start", "argv": sys.argv[:3]})
    sys.addaudithook(_hook)  # a forked process keeps the hooks, and says it started
    os.register_at_fork(after_in_child=lambda: _write({"event": "start", "argv": ["forked", *sys.argv[:3]]}))
