"""A warm host for jobs: each job forked from a process that has already imported the ML libraries.

A job spends its first seconds importing what it needs (torch, transformers, peft, llama.cpp's bindings: 7-8 s
of a 2-core machine for a training job; a data preparation job starts computing 9 s after it was started), and
a session (the TUI, a script that prepares, trains, exports and evaluates) starts many. The first job of a user
starts a host (`python -c ... appliance.jobhost KEY`, in its own session) that imports those libraries once and
then forks each job, which starts at once; a host idle for IDLE_S seconds ends.

A forked job must be the job a plain `python -m appliance.worker DIR` would have been, or not be forked:
- the host serves one environment: its key hashes the interpreter, the package's place, this file's
  version and every environment variable but those only the appliance's own code reads after the fork
  (AFTER_FORK), so a changed PYTHONPATH, thread setting or library switch gets a host of its own;
- the starter sends its working directory, umask, resource limits, niceness, CPU affinity and cgroup, and
  the host refuses (and the job starts cold) when it cannot give the child exactly those;
- the job gets the starter's log and lock files by SCM_RIGHTS, a session of its own, fresh random
  seeds, and the signal dispositions of a new process; the host reports its exit status to the starter;
- only a process that has computed nothing forks: the host imports and waits (forking after torch has run
  a parallel region, or with CUDA initialised, is unsafe), and on a host with an NVIDIA driver every job
  starts cold.
APPLIANCE_JOB_HOST=0 turns it off. Anything that goes wrong on the way (no host, a refusal, a host that
does not answer) starts the job cold, as before; a job is never started twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from appliance.fsutil import fds_of

WARM_STAGES = ("import", "data", "train", "export", "eval", "sweep")  # every stage imports some of PRELOAD
AFTER_FORK = ("APPLIANCE_HOME", "APPLIANCE_FAULT", "APPLIANCE_FAULT_TRACE", "APPLIANCE_API_KEY",
              "PYTEST_CURRENT_TEST")  # read at run time only
IDLE_S = 300.0
ANSWER_S = 180.0  # the longest a starter waits for a host that is still importing
PRELOAD = ("numpy", "torch", "safetensors.torch", "tokenizers", "jinja2.sandbox", "transformers",
           "transformers.modeling_utils", "transformers.models.auto.modeling_auto",
           "transformers.models.auto.tokenization_auto", "transformers.optimization", "peft", "llama_cpp")
_LIMITS = ("RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_MEMLOCK",
           "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_STACK")
_PACKAGE = Path(__file__).resolve().parent
_HEADER = struct.Struct("!I")


def enabled(stage: str, env: dict[str, str]) -> bool:
    """Whether a job of `stage` with `env` is forked from a host (else it starts its own interpreter)."""
    return (stage in WARM_STAGES and env.get("APPLIANCE_JOB_HOST", "1") != "0"
            and shutil.which("nvidia-smi", path=env.get("PATH")) is None and sys.platform.startswith("linux"))


def key(env: dict[str, str], keep_out: tuple[str, ...]) -> str:
    """What a host serves: jobs whose interpreter, package, environment and kept-out modules are these."""
    this = Path(__file__)
    shared = {k: v for k, v in env.items() if k not in AFTER_FORK}
    identity = [os.getuid(), sys.executable, str(_PACKAGE), this.stat().st_mtime_ns, sorted(shared.items()),
                sorted(keep_out)]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]


def _address(host_key: str) -> str:
    return f"\0appliance-jobhost-{os.getuid()}-{host_key}"  # abstract: no file to leave behind


# ----------------------------------------------------------------------------------------------- the starter


class HostedProcess:
    """A job forked by a host, with the part of `subprocess.Popen`'s interface that jobs use. The host, its
    parent, tells this starter the exit status; when the host is gone the status is unknown (None) and the
    job is followed by its pid."""

    def __init__(self, connection: socket.socket, pid: int) -> None:
        self._connection = connection
        self.pid = pid
        self.returncode: int | None = None
        self._buffer = b""
        self._orphaned = False

    def _read(self, timeout: float | None) -> None:
        if self.returncode is not None or self._orphaned:
            return
        ready, _, _ = select.select([self._connection], [], [], timeout)
        if not ready:
            return
        chunk = self._connection.recv(4096)
        if not chunk:
            self._orphaned = True
            self._connection.close()
            return
        self._buffer += chunk
        if b"\n" in self._buffer:
            message = json.loads(self._buffer.split(b"\n", 1)[0])
            self.returncode = os.waitstatus_to_exitcode(message["exit"])
            self._connection.close()

    def _alive(self) -> bool:
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")

    def poll(self) -> int | None:
        self._read(0)
        if self._orphaned and not self._alive():
            return self.returncode if self.returncode is not None else -1
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._read(0.2 if self._orphaned else (left if left is not None else 1.0))
            if self.returncode is not None or (self._orphaned and not self._alive()):
                return self.returncode
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(["appliance.worker"], timeout or 0.0)
            if self._orphaned:
                time.sleep(0.1)

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def spawn(job_dir: Path, env: dict[str, str], keep_out: tuple[str, ...], log_fd: int,
          lock_fd: int) -> HostedProcess | None:
    """Fork the worker of `job_dir` from the host for `env` (starting that host when there is none);
    None when no host can give this job exactly what a process of its own would have (and none was forked:
    when the answer is lost, the process that holds the job's lock, if any, is the job)."""
    host_key = key(env, keep_out)
    try:
        connection = _connect(host_key, env, keep_out)
    except OSError:
        return None
    try:
        _send(connection, _request(job_dir, env), [log_fd, lock_fd])
        reply = _receive_line(connection, ANSWER_S)
    except (OSError, ValueError):
        reply = None
    if reply is not None and "pid" in reply:
        return HostedProcess(connection, int(reply["pid"]))
    connection.close()
    if reply is None:  # no answer: a host that forked, then died or was too slow to say so, leaves the lock held
        holder = _holder(os.readlink(f"/proc/self/fd/{lock_fd}"))
        if holder is not None:
            orphan = HostedProcess(connection, holder)
            orphan._orphaned = True
            return orphan
    return None


def _holder(lock_path: str) -> int | None:
    """Another process of this user that holds `lock_path` open, if any."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and lock_path in fds_of(int(entry)):
            return int(entry)
    return None


def _connect(host_key: str, env: dict[str, str], keep_out: tuple[str, ...]) -> socket.socket:
    address = _address(host_key)
    connection = _try_connect(address)
    if connection is None:
        _start_host(host_key, env, keep_out)
        deadline = time.monotonic() + 10.0  # it binds before it imports anything heavy
        while connection is None and time.monotonic() < deadline:
            time.sleep(0.05)
            connection = _try_connect(address)
    if connection is None:
        raise ConnectionRefusedError(f"no job host answers at {address!r}")
    return connection


def _try_connect(address: str) -> socket.socket | None:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(address)
    except OSError:
        connection.close()
        return None
    return connection


def _start_host(host_key: str, env: dict[str, str], keep_out: tuple[str, ...]) -> None:
    code = (f"import sys; sys.path.insert(0, {str(_PACKAGE.parent)!r}); "
            "from appliance import jobhost; jobhost.main(sys.argv[2:])")
    subprocess.Popen([sys.executable, "-c", code, "appliance.jobhost", host_key, ",".join(keep_out)],
                     env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


def _request(job_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    umask = os.umask(0o22)
    os.umask(umask)
    return {"job_dir": str(job_dir), "env": env, "cwd": os.getcwd(), "umask": umask,
            "limits": {name: list(resource.getrlimit(getattr(resource, name))) for name in _LIMITS},
            "nice": os.getpriority(os.PRIO_PROCESS, 0), "affinity": sorted(os.sched_getaffinity(0)),
            "cgroup": _cgroup()}


def _cgroup() -> str:
    try:
        return Path("/proc/self/cgroup").read_text()
    except OSError:
        return ""


def _send(connection: socket.socket, message: dict[str, Any], fds: list[int]) -> None:
    body = json.dumps(message).encode()
    if fds:
        socket.send_fds(connection, [_HEADER.pack(len(body))], fds)
    else:
        connection.sendall(_HEADER.pack(len(body)))
    connection.sendall(body)


def _receive_line(connection: socket.socket, timeout: float) -> dict[str, Any] | None:
    connection.settimeout(timeout)
    data = b""
    while b"\n" not in data:
        chunk = connection.recv(4096)
        if not chunk:
            return None
        data += chunk
    connection.settimeout(None)
    answer: dict[str, Any] = json.loads(data.split(b"\n", 1)[0])
    return answer


# -------------------------------------------------------------------------------------------------- the host


def main(argv: list[str]) -> None:
    """The host: bind the key's address (a host already there wins), import, then fork jobs until idle."""
    from appliance import offline, unused

    host_key, keep_out = argv[0], tuple(filter(None, argv[1].split(",")))
    offline.activate()  # before any library loads, as in a job
    unused.keep_out(keep_out)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(_address(host_key))
    except OSError:
        return  # another host serves this key
    listener.listen(64)
    from appliance import toolchain

    toolchain.preload_cuda()  # before llama_cpp among PRELOAD: a CUDA runtime needs its libraries found first
    for name in PRELOAD:
        with contextlib.suppress(Exception):  # a job that needs a missing library says so itself
            __import__(name)
    _serve(listener)


def _serve(listener: socket.socket) -> None:
    wake_read, wake_write = socket.socketpair()
    for end in (wake_read, wake_write):
        end.setblocking(False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_write.fileno())  # a child's end wakes the loop at once
    waiting: set[socket.socket] = set()
    children: dict[int, socket.socket] = {}
    idle_since = time.monotonic()
    while children or waiting or time.monotonic() - idle_since < IDLE_S:
        ready, _, _ = select.select([listener, wake_read, *waiting], [], [], 5.0)
        for source in ready:
            if source is listener:
                waiting.add(listener.accept()[0])
            elif source is wake_read:
                with contextlib.suppress(BlockingIOError):
                    wake_read.recv(512)
            else:
                waiting.discard(source)
                pid = _handle(source, [listener, wake_read, wake_write, *waiting, *children.values()])
                if pid is None or pid == QUIT:
                    source.close()
                    if pid == QUIT and not children:
                        return
                else:
                    children[pid] = source
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                connection = children.pop(pid)
                with contextlib.suppress(OSError):  # a starter that went away no longer asks
                    connection.sendall(json.dumps({"exit": status}).encode() + b"\n")
                connection.close()
        if children or waiting:
            idle_since = time.monotonic()


QUIT = -1


def _handle(connection: socket.socket, hosting: list[socket.socket]) -> int | None:
    """Read one request and fork its job: the child's pid, or None after a refusal sent to the starter.
    `hosting`: the host's other sockets, which the child closes."""
    fds: list[int] = []
    try:
        uid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))[1]
        connection.settimeout(10.0)
        header, fds, _, _ = socket.recv_fds(connection, _HEADER.size, 2)
        if uid != os.getuid() or len(header) != _HEADER.size:
            raise ValueError("not a request of this user")
        size = _HEADER.unpack(header)[0]
        body = b""
        while len(body) < size:
            chunk = connection.recv(size - len(body))
            if not chunk:
                raise ValueError("the request was cut short")
            body += chunk
        request = json.loads(body)
        if request.get("quit"):
            return QUIT
        if len(fds) != 2:
            raise ValueError("a job request carries its log and lock files")
        refusal = _cannot_reproduce(request)
        if threading.active_count() != 1:  # a fork copies the forking thread alone
            refusal = "the host runs threads"
        connection.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            if connection.recv(1, socket.MSG_PEEK) == b"":
                refusal = "the starter went away"  # it may have started the job itself: never twice
        connection.setblocking(True)
        if not refusal:
            pid = os.fork()
            if pid == 0:
                _become_job(request, fds[0], fds[1], [connection, *hosting])  # never returns
            with contextlib.suppress(OSError):  # the starter went away: the job runs all the same
                connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            return pid
    except (OSError, ValueError) as exc:
        refusal = str(exc)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    with contextlib.suppress(OSError):
        connection.sendall(json.dumps({"refused": refusal}).encode() + b"\n")
    return None


def _cannot_reproduce(request: dict[str, Any]) -> str:
    """Why a child of this host could not run as the starter's own child would (empty: it can)."""
    if request["cgroup"] != _cgroup():
        return "the starter is in another cgroup"
    for name, (soft, hard) in request["limits"].items():
        own_hard = resource.getrlimit(getattr(resource, name))[1]
        if own_hard != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > own_hard):
            return f"the starter's {name} is above the host's"
        if soft != resource.RLIM_INFINITY and hard != resource.RLIM_INFINITY and soft > hard:
            return f"the starter's {name} is inconsistent"
    if request["nice"] < os.getpriority(os.PRIO_PROCESS, 0):
        return "the starter runs at a higher priority than the host"
    if not set(request["affinity"]) <= os.sched_getaffinity(0):
        return "the starter may run on CPUs the host may not"
    if not Path(request["cwd"]).is_dir():
        return "the starter's working directory is gone"
    return ""


def _become_job(request: dict[str, Any], log_fd: int, lock_fd: int, hosting: list[socket.socket]) -> None:
    """In the forked child: drop the host's sockets, take the starter's settings and files (the lock stays at the
    number it came with; what the libraries opened as they loaded stays open, as in a process of its own), run
    the worker and exit."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        os.setsid()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN if signum == signal.SIGPIPE else signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for name, (soft, hard) in request["limits"].items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
        os.setpriority(os.PRIO_PROCESS, 0, request["nice"])
        os.sched_setaffinity(0, request["affinity"])
        os.umask(request["umask"])
        os.chdir(request["cwd"])
        for sock in hosting:
            sock.close()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        for fd in (devnull, log_fd):
            if fd > 2:
                os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        _reseed()
        sys.argv = [str(_PACKAGE / "worker.py"), request["job_dir"]]
        from appliance import worker

        code = worker.main(["appliance.worker", request["job_dir"]])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 (the job's log says why; the exit status says it failed)
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            import atexit

            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _reseed() -> None:
    """A new process draws fresh seeds; a forked one would share the host's."""
    import random

    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def stop_idle() -> None:
    """Ask this user's hosts to end now; one with a job running carries on until it is idle (a test session's
    end: no host outlives it for IDLE_S)."""
    prefix = f"@appliance-jobhost-{os.getuid()}-"
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return
    for name in {line.split()[-1] for line in lines if line.split()[-1].startswith(prefix)}:
        connection = _try_connect("\0" + name[1:])
        if connection is not None:
            with contextlib.suppress(OSError), connection:
                _send(connection, {"quit": True}, [])
