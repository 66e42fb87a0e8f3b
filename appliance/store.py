"""The on-disk model store: base models, runs and jobs, in one movable folder.

A base model is registered when its folder `base/<name>/` exists with a `source.json`: imports
build the folder under a hidden temporary name and rename it into place as their last step, so an
interrupted import never shows up. Leftovers of interrupted imports are swept on the next open.
This module stays light (no ML imports): the TUI and `--help` load it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from appliance.errors import StoreError
from appliance.fsutil import atomic_write_text, fsync_dir, inside

if TYPE_CHECKING:
    from appliance.run import Run

SOURCE_FILE = "source.json"
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_STAGING_PREFIX = ".staging-"


class FileInfo(BaseModel):
    size: int
    sha256: str


class SourceInfo(BaseModel):
    kind: str = Field(description="package, dir or gguf")
    location: str
    package: str | None = None
    package_version: str | None = None
    sha256: str | None = Field(default=None, description="sha256 of a single-file source")


class ModelInfo(BaseModel):
    """What the store knows about an imported base model (its source.json)."""

    name: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    parameters: int
    context_length: int | None
    dtype: str
    chat_template: bool
    special_tokens: dict[str, str | None]
    license: str | None
    source: SourceInfo
    files: dict[str, FileInfo]
    imported_at: str
    appliance_version: str
    notes: list[str] = Field(default_factory=list)


class CatalogEntry(BaseModel):
    name: str
    description: str = ""
    source: str
    file: str | None = None
    license: str | None = None
    default: bool = False


def default_root() -> Path:
    """APPLIANCE_HOME if set, else the `models/` folder of the project checkout."""
    env = os.environ.get("APPLIANCE_HOME")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "models"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_id(prefix: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{prefix}-{stamp}-{uuid.uuid4().hex[:6]}"


class Store:
    """A model store rooted at one folder. Cheap to open; creates its folders on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.base_dir = self.root / "base"
        self.runs_dir = self.root / "runs"
        self.jobs_dir = self.root / "jobs"
        self.egress_log = self.root / "audit" / "egress.jsonl"
        self.serve_audit_log = self.root / "audit" / "serve.jsonl"  # `appliance serve`'s, unless told otherwise
        self.cache_dir = self.root / "cache"  # measurements kept for the next job (pii_eval.stored); safe to delete

    @classmethod
    def open(cls, root: str | Path | None = None) -> Store:
        store = cls(Path(root) if root else default_root())
        try:
            for folder in (store.base_dir, store.runs_dir, store.jobs_dir):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot use {store.root} as the model store: {exc.strerror}",
                "Point APPLIANCE_HOME or --store at a writable folder.",
            ) from exc
        store.sweep()
        return store

    # -- base models -------------------------------------------------------------------------

    def model_dir(self, name: str) -> Path:
        """The folder of a base model; a name that is not a plain model name (a path, `..`) is refused."""
        from appliance.config import MODEL_NAME_RE

        if not MODEL_NAME_RE.match(name):
            raise StoreError(f"{name!r} is not a model name",
                             "Model names are 1-64 lowercase letters, digits, '.', '_' or '-' "
                             "(`appliance models list` shows them).")
        return self.base_dir / name

    def list_models(self) -> list[ModelInfo]:
        models = []
        for folder in sorted(self.base_dir.iterdir()) if self.base_dir.exists() else []:
            if folder.name.startswith(".") or not (folder / SOURCE_FILE).is_file():
                continue
            models.append(self._read_info(folder))
        return models

    def has_model(self, name: str) -> bool:
        try:
            return (self.model_dir(name) / SOURCE_FILE).is_file()
        except StoreError:
            return False

    def get_model(self, name: str) -> ModelInfo:
        self.model_dir(name)  # a name that is not a model name is said to be one
        if not self.has_model(name):
            known = ", ".join(m.name for m in self.list_models()) or "none yet"
            raise StoreError(
                f"no model named {name!r} in the store at {self.root}",
                f"Imported models: {known}. Import one with `appliance models import SOURCE`.",
            )
        return self._read_info(self.model_dir(name))

    def resolve_model(self, name: str | None, what: str, hint: str) -> str:
        """`name`, or the catalog's default when None; raises (with `hint`) unless it is imported."""
        if name is None:
            entry = self.catalog_entry("default")
            name = entry.name if entry else None
        if name is None or not self.has_model(name):
            raise StoreError(f"the {what} {name!r} is not in the store", hint)
        return name

    def _read_info(self, folder: Path) -> ModelInfo:
        path = folder / SOURCE_FILE
        try:
            return ModelInfo.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"{path} is unreadable or damaged: {exc}",
                f"Remove the model (appliance models remove {folder.name}) and import it again.",
            ) from exc

    def remove_model(self, name: str) -> None:
        self.get_model(name)  # raises a helpful error when absent
        folder = self.model_dir(name)
        # Unregister first (atomic rename), then delete: a crash in between leaves only litter.
        doomed = self.base_dir / f"{_STAGING_PREFIX}removed-{name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        os.rename(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    @contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A hidden folder to build a model in; renamed to `base/<name>` only if the block
        finishes. On any error (or cancellation) the folder is removed and nothing is registered."""
        if self.has_model(name):
            raise StoreError(
                f"a model named {name!r} is already in the store",
                f"Choose another name with --name, or remove it first (appliance models remove {name}).",
            )
        staging = self.base_dir / f"{_STAGING_PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        staging.mkdir(parents=True)
        try:
            yield staging
            if not (staging / SOURCE_FILE).is_file():
                raise StoreError(f"internal: import of {name!r} wrote no {SOURCE_FILE}")
            fsync_dir(staging)
            try:
                os.rename(staging, self.model_dir(name))
            except OSError as exc:
                raise StoreError(
                    f"a model named {name!r} appeared in the store while importing",
                    "Import again under another name.",
                ) from exc
            fsync_dir(self.base_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def sweep(self) -> list[Path]:
        """Remove staging folders left by processes that no longer run (killed imports)."""
        removed: list[Path] = []
        if not self.base_dir.exists():
            return removed
        for folder in self.base_dir.iterdir():
            if not folder.name.startswith(_STAGING_PREFIX):
                continue
            pid = _pid_in_name(folder.name)
            if pid is not None and pid != os.getpid() and _alive(pid):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        return removed

    # -- catalog -----------------------------------------------------------------------------

    def catalog(self) -> list[CatalogEntry]:
        """Built-in entries, overridden or extended by the store's own catalog.toml."""
        entries: dict[str, CatalogEntry] = {}
        builtin = resources.files("appliance").joinpath("catalog.toml").read_text(encoding="utf-8")
        sources: list[tuple[str, str]] = [("built-in catalog", builtin)]
        local = self.root / "catalog.toml"
        if local.is_file():
            sources.append((str(local), local.read_text(encoding="utf-8")))
        for label, text in sources:
            try:
                data: dict[str, Any] = tomllib.loads(text)
                for name, fields in data.get("models", {}).items():
                    entries[name] = CatalogEntry(name=name, **fields)
            except (tomllib.TOMLDecodeError, TypeError, ValueError) as exc:
                raise StoreError(
                    f"{label} is not a valid catalog: {exc}",
                    "Each entry is a [models.NAME] table with at least `source = ...`.",
                ) from exc
        return list(entries.values())

    def catalog_entry(self, name: str) -> CatalogEntry | None:
        entries = self.catalog()
        if name == "default":
            return next((e for e in entries if e.default), None)
        return next((e for e in entries if e.name == name), None)

    # -- runs and jobs -----------------------------------------------------------------------

    def run(self, run_id: str) -> Run:
        """An existing run; ids that are paths (`..`, `/`) or links out of the store are refused."""
        from appliance.run import Run

        folder = self._run_path(run_id)
        if not folder.is_dir():
            raise StoreError(f"no run {run_id!r} in {self.runs_dir}", "The TUI's Home and `appliance runs` list "
                             "them; leave out --run to start a new one.")
        return Run(self, folder)

    def new_run(self, name: str | None = None) -> Run:
        """A new, empty run: named `name`, or `run-<time>-<random>` when not given."""
        from appliance.run import Run

        folder = self._run_path(new_id("run") if name is None else name)
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            raise StoreError(f"a run named {folder.name!r} already exists in {self.runs_dir}",
                             "Choose another name, or give that run to a stage that works on it.") from None
        return Run(self, folder)

    def run_or_new(self, name: str | None) -> Run:
        """The run called `name` when it exists, else a new run of that name (or a new unnamed run)."""
        if name is not None and self._run_path(name).is_dir():
            return self.run(name)
        return self.new_run(name)

    def runs(self) -> list[Run]:
        """Every run of the store, by name."""
        from appliance.run import Run

        if not self.runs_dir.is_dir():
            return []
        return [Run(self, d) for d in sorted(self.runs_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")]

    def _run_path(self, run_id: str) -> Path:
        if not RUN_ID_RE.match(run_id):
            raise StoreError(f"{run_id!r} is not a run name",
                             "Run names are 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
                             "digit, like run-20261129-101500-a1b2c3 (the TUI's Home lists them).")
        return inside(self.runs_dir, run_id, "run")

    def new_job_dir(self, kind: str) -> Path:
        folder = self.jobs_dir / new_id(kind)
        folder.mkdir(parents=True)
        return folder


def write_model_info(folder: Path, info: ModelInfo) -> None:
    atomic_write_text(folder / SOURCE_FILE, json.dumps(info.model_dump(), indent=2) + "\n")


def _pid_in_name(name: str) -> int | None:
    # .staging-<name>-<pid>-<hex>: the pid is the second field from the end
    parts = name.rsplit("-", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return int(parts[1])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
