"""Jobs forked from a warm host (appliance.jobhost) are the jobs a process of their own would have been."""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path

import pytest
from conftest import TINY_MODEL, TRAIN_SETTINGS, clone_run

from appliance import faults, jobhost, jobs
from appliance.config import TrainConfig
from appliance.errors import JobFailed
from appliance.fsutil import fds_of
from appliance.store import Store

TRAIN = {**TRAIN_SETTINGS, "max_steps": 2, "batch_size": 2, "max_seq_len": 64, "eval_every": 100, "save_every": 100,
         "dtype": "float32", "task_eval_items": 0, "base_model": TINY_MODEL}


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + 120
    while _stat(pid)[0] != "T":
        assert time.monotonic() < deadline, "the job never reached its first step"
        time.sleep(0.1)


def test_a_hosted_job_gets_the_starters_settings_files_and_signals(tiny_prepared: tuple[Store, Path]) -> None:
    store, source = tiny_prepared
    first = clone_run(store, source, "hosted-first")
    cfg = TrainConfig(store=str(store.root), **TRAIN)
    jobs.start("train", first, cfg).wait()  # the host exists now (this job may have started it)

    run_dir = clone_run(store, source, "hosted")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    umask = os.umask(0o027)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50 * 2**30, hard))
    try:  # frozen at its first step: alive and holding its run's lock, for /proc to be read
        job = jobs.start("train", run_dir, cfg, env={faults.ENV: "stop@train.step#1"})
    finally:
        os.umask(umask)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert isinstance(job.process, jobhost.HostedProcess)
    pid = job.pid
    try:
        _wait_stopped(pid)  # the fault was asked for in the job's environment alone
        assert b"appliance.jobhost" in Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/status").read_text()
        assert "Umask:\t0027" in status
        assert f"{50 * 2**30}" in Path(f"/proc/{pid}/limits").read_text()
        assert int(_stat(pid)[3]) == pid  # a session of its own (a Ctrl-C in the terminal reaches the starter)
        assert Path(os.readlink(f"/proc/{pid}/cwd")) == Path.cwd()
        opened = fds_of(pid)
        assert str((run_dir / jobs.LOCK_FILE).resolve()) in opened
        assert os.readlink(f"/proc/{pid}/fd/1") == os.readlink(f"/proc/{pid}/fd/2") == str(run_dir / jobs.LOG_FILE)
        assert not [fd for fd in opened if fd.startswith("socket:")], opened  # none of the host's connections
        attached = jobs.attach(run_dir)
        assert attached is not None and attached.pid == pid and attached.running()
        assert jobs.busy(run_dir)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(JobFailed, match="SIGKILL"):
            job.wait()
    finally:
        if job.running():
            os.kill(pid, signal.SIGKILL)
    assert job.returncode == -signal.SIGKILL
    assert not jobs.attach(run_dir).running() and not jobs.busy(run_dir)  # type: ignore[union-attr]


def test_a_host_serves_one_environment() -> None:
    env = {"PATH": "/usr/bin", "APPLIANCE_HOME": "/a", "OMP_NUM_THREADS": "2"}
    same = jobhost.key(env, ("sklearn",))
    assert jobhost.key({**env, "APPLIANCE_HOME": "/b", "PYTEST_CURRENT_TEST": "x"}, ("sklearn",)) == same
    assert jobhost.key({**env, "OMP_NUM_THREADS": "1"}, ("sklearn",)) != same  # read when the libraries load
    assert jobhost.key({**env, "PYTHONPATH": "/x"}, ("sklearn",)) != same
    assert jobhost.key(env, ("sklearn", "bitsandbytes")) != same  # an Unsloth job may import 4-bit layers
    assert jobhost.enabled("data", env) and not jobhost.enabled("train", {**env, "APPLIANCE_JOB_HOST": "0"})


def test_a_host_refuses_what_it_cannot_give_a_child() -> None:
    request = jobhost._request(Path("/tmp/job"), {})
    assert jobhost._cannot_reproduce(request) == ""
    assert "cgroup" in jobhost._cannot_reproduce({**request, "cgroup": "0::/elsewhere\n"})
    assert "priority" in jobhost._cannot_reproduce({**request, "nice": request["nice"] - 1})
    assert "CPUs" in jobhost._cannot_reproduce({**request, "affinity": [*request["affinity"], 4096]})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    above = {**request["limits"], "RLIMIT_NOFILE": [soft, hard + 1]}
    assert "RLIMIT_NOFILE" in jobhost._cannot_reproduce({**request, "limits": above})
    assert "working directory" in jobhost._cannot_reproduce({**request, "cwd": "/nonexistent/dir"})


def test_when_a_hosts_answer_is_lost_the_process_holding_the_lock_is_the_job(tmp_path: Path) -> None:
    import subprocess
    import sys

    lock = tmp_path / jobs.LOCK_FILE
    lock.touch()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); print(1, flush=True); "
                               "time.sleep(60)", str(lock)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline()
        mine = os.open(lock, os.O_RDONLY)  # the starter's own hold does not count
        try:
            assert jobhost._holder(str(lock)) == holder.pid
        finally:
            os.close(mine)
    finally:
        holder.kill()
        holder.wait()
    assert jobhost._holder(str(lock)) is None


def test_a_worker_opening_and_closing_files_is_never_taken_for_ended(tmp_path: Path) -> None:
    """A hosted worker is recognised by the lock it holds, read from /proc/PID/fd: a descriptor that the
    worker closes between the listing and its readlink (it opens and closes files all the time while it
    imports) must not make the lock look released and the running job look dead to a follower."""
    import subprocess
    import sys

    held = tmp_path / "held"
    held.write_text("")
    churn = ("import os, sys\nkept = open(sys.argv[1])\nprint('ready', flush=True)\n"
             "while True:\n    fds = [os.open(sys.argv[1], os.O_RDONLY) for _ in range(64)]\n"
             "    for fd in fds:\n        os.close(fd)\n")
    child = subprocess.Popen([sys.executable, "-c", churn, str(held)], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        missed = sum(str(held) not in fds_of(child.pid) for _ in range(3000))
        assert missed == 0, f"the held file was missing from {missed} of 3000 readings"
    finally:
        child.kill()
        child.wait()
    assert fds_of(child.pid) == []  # reaped: nothing to read
