"""Small filesystem helpers: hashing, and writes that never leave a half-written file behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from appliance import faults

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename it into place."""
    faults.point(f"write:{path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def inside(root: Path, relative: str | Path, what: str) -> Path:
    """`root / relative`, refused (StoreError) when it would lead outside `root`: an absolute path, a `..`,
    or a symbolic link on the way that points elsewhere. For names that come from users or from files."""
    from appliance.errors import StoreError

    candidate = Path(relative)
    if not str(relative) or candidate.is_absolute() or ".." in candidate.parts:
        raise StoreError(f"{what} {str(relative)!r} is not a plain name inside {root}",
                         "Names in the store are single folder or file names, without '/' or '..'.")
    path = root / candidate
    if not path.resolve().is_relative_to(root.resolve()):
        raise StoreError(f"{what} {str(relative)!r} leads outside {root} through a symbolic link",
                         f"Remove the link {path} or replace it with the real folder.")
    return path


def replace_dir(built: Path, final: Path) -> None:
    """Put the complete folder `built` where `final` is, so that readers see the old folder or the new one,
    whole, never a mix: an older `final` is renamed aside first (a hidden name, which the run's sweep
    removes should the process die before it does) and deleted after."""
    if final.exists():
        old = final.with_name(f".{final.name}-old-{uuid.uuid4().hex[:6]}")
        os.rename(final, old)
        os.rename(built, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(built, final)
    fsync_dir(final.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; empty when the file is missing, unreadable or not an object
    (for status views that show what is there, never fail on what is not)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def same_file_system(path: Path, other: Path) -> bool:
    """Whether a hard link can join `path` to a file under `other` (the nearest existing folder of each)."""

    def device(probe: Path) -> int:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return probe.stat().st_dev

    return device(path.resolve()) == device(other.resolve())


def fds_of(pid: int) -> list[str]:
    """The paths of the files `pid` holds open (empty when it cannot be read).

    A descriptor closed between the listing and its readlink is skipped, not taken for the end of the
    process: a job opens and closes files all the time while it imports and reads its data."""
    folder = Path(f"/proc/{pid}/fd")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    paths = []
    for name in names:
        try:
            paths.append(os.readlink(folder / name))
        except OSError:
            continue
    return paths
