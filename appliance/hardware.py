"""What this machine has: GPUs and their memory, RAM, free disk. No ML imports at module level."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from pydantic import BaseModel


class Gpu(BaseModel):
    index: int
    name: str
    memory_total_mb: int
    memory_free_mb: int | None = None


class Memory(BaseModel):
    total_mb: int
    available_mb: int


def memory() -> Memory:
    fields: dict[str, int] = {}
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) // 1024  # kB -> MB
    return Memory(total_mb=fields["MemTotal"], available_mb=fields.get("MemAvailable", fields["MemFree"]))


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started its program.

    VmHWM belongs to the process's own address space. getrusage's ru_maxrss does not: it survives
    exec, so a worker started from a large parent (a test session holding models) reports the
    parent's peak as its own.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)  # kB -> MB
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_mb() -> float:
    """This process's resident memory now."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    raise OSError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> None:
    """Start `peak_rss_mb` again from the memory in use now (Linux: writes 5 to /proc/self/clear_refs), so a
    measurement covers one piece of work and not what came before it."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")


def release_freed_memory() -> None:
    """Hand memory that this process freed back to the system (glibc's malloc_trim; nothing elsewhere).

    The C allocator keeps freed blocks below its mmap threshold (which grows to 32 MB as large blocks are
    freed) for reuse; a stage that streams tensors of changing shapes would otherwise hold on to blocks of
    earlier tensors, and its resident memory would creep up with the model's size instead of staying at a
    few blocks."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def disk_free_mb(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free // (1024 * 1024)


def nvidia_gpus(timeout_s: float = 10.0) -> list[Gpu]:
    """GPUs as the NVIDIA driver sees them (empty without a driver); needs no torch."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=timeout_s, check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            gpus.append(Gpu(index=int(parts[0]), name=parts[1], memory_total_mb=int(float(parts[2])),
                            memory_free_mb=int(float(parts[3]))))
    return gpus


def torch_gpus() -> list[Gpu]:
    """CUDA devices as torch sees them (what training will actually use)."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, _total = torch.cuda.mem_get_info(index)
        gpus.append(Gpu(index=index, name=props.name, memory_total_mb=props.total_memory // 2**20,
                        memory_free_mb=free // 2**20))
    return gpus
