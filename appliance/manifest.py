"""The audit manifest of a run: what went in, what came out, with which tools, signed.

`manifest.json` lists the sha256 of every input (the data files, the base model's files, the
run's config) and every artifact (prepared splits, adapter, merged model, each GGUF and the
files beside it), the versions of the libraries and of llama.cpp, and the verification and
evaluation results. It is signed with the store's Ed25519 key, created on first use with
owner-only permissions. `verify` re-hashes every file and checks the signature, and names each
file that changed, went missing or appeared unrecorded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import stat
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from appliance import __version__
from appliance.errors import ApplianceError, StoreError
from appliance.fsutil import atomic_write_text, sha256_file
from appliance.run import Run
from appliance.store import Store, now_iso

KEY_FILE = "signing.key"
PUBLIC_FILE = "signing.pub"
FORMAT = 1
# what a run's manifest covers, relative to the run folder (patterns for Path.glob)
RUN_FILES = ("run.yaml", "accelerate.yaml", "data/*.jsonl", "data/data_report.json", "data/schema.json",
             "data/pii_recognizers.yaml", "adapter/*",
             "merged/*", "gguf/*", "eval/*.json")
LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "safetensors", "tokenizers", "llama_cpp_python",
             "gguf", "unsloth", "bitsandbytes")


class ManifestError(ApplianceError):
    title = "Audit manifest problem"


class VerifyReport(BaseModel):
    run: str
    ok: bool
    signature: str  # "valid", or why not
    checked: int
    changed: list[str]
    missing: list[str]
    unrecorded: list[str]
    unavailable: list[str]  # inputs outside the store that are no longer there (not a failure)


# -- keys ----------------------------------------------------------------------------------


def key_dir(store: Store) -> Path:
    return store.root / "keys"


def _load_or_create_key(store: Store) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder = key_dir(store)
    path = folder / KEY_FILE
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ManifestError(f"the signing key {path} can be read by other users (mode {mode:o})",
                                f"Restrict it with `chmod 600 {path}`; if others may have copied it, delete it "
                                "and the store's keys folder to make a new one, then export again.")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ManifestError(f"{path} is not an Ed25519 private key", "Remove it to have a new key created.")
        return key
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # owner-only from the first byte
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    atomic_write_text(folder / PUBLIC_FILE, _public_b64(key) + "\n")
    return key


def _public_raw(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    raw: bytes = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw


def _public_b64(key: Any) -> str:
    return base64.b64encode(_public_raw(key)).decode()


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# -- building ------------------------------------------------------------------------------


def _entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _covered(run_dir: Path) -> list[str]:
    """The run's files the manifest covers, relative to the run folder (temporary files excluded)."""
    names = {path.relative_to(run_dir).as_posix() for pattern in RUN_FILES for path in run_dir.glob(pattern)
             if path.is_file() and not path.name.startswith(".")}
    return sorted(names)


def _run_files(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {rel: _entry(run_dir / rel) for rel in _covered(run_dir)}


def versions() -> dict[str, str]:
    found = {"appliance": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        from appliance import toolchain

        converter = toolchain.converter_info()
        found["ggml"] = converter.ggml
        found["llama_cpp_source_sha256"] = converter.source_sha256
    except ApplianceError:
        pass
    return found


def build(run: Run) -> dict[str, Any]:
    """The manifest of the run as it is now (unsigned)."""
    store = run.store
    inputs: dict[str, Any] = {"data": [], "base_model": None}
    report = run.data_report()
    if report is not None:
        inputs["data"] = [item.model_dump(mode="json") for item in report.inputs]
    try:
        base_model: str | None = run.base_model()
    except StoreError:
        base_model = None  # its base model is gone from the store: the run's own files are still recorded
    if base_model is not None:
        folder = store.model_dir(base_model)
        inputs["base_model"] = {
            "name": base_model,
            "files": {p.name: _entry(p) for p in sorted(folder.iterdir()) if p.is_file()},
        }
    manifest: dict[str, Any] = {
        "format": FORMAT, "run": run.id, "created": now_iso(), "versions": versions(),
        "inputs": inputs, "files": _run_files(run.path),
    }
    verification = run.verification()
    if verification is not None:
        manifest["verification"] = verification.model_dump(mode="json")
    evaluations = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(run.eval_dir.glob("*.json"))}
    if evaluations:
        manifest["evaluation"] = evaluations
    return manifest


def write(run: Run) -> Path:
    """Build, sign and write the run's manifest (atomically)."""
    key = _load_or_create_key(run.store)
    manifest = build(run)
    public = _public_raw(key)
    manifest["signature"] = {
        "algorithm": "ed25519",
        "key_id": key_id(public),
        "public_key": base64.b64encode(public).decode(),
        "value": base64.b64encode(key.sign(_canonical(manifest))).decode(),
    }
    atomic_write_text(run.manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return run.manifest_path


# -- verifying -----------------------------------------------------------------------------


def _check_signature(store: Store, manifest: dict[str, Any]) -> str:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    signature = manifest.pop("signature", None)
    if not isinstance(signature, dict) or signature.get("algorithm") != "ed25519":
        return "missing: the manifest is not signed"
    try:
        public = base64.b64decode(signature["public_key"])
        value = base64.b64decode(signature["value"])
        Ed25519PublicKey.from_public_bytes(public).verify(value, _canonical(manifest))
    except (KeyError, ValueError, InvalidSignature):
        return "invalid: the manifest was changed after it was signed"
    trusted = key_dir(store) / PUBLIC_FILE
    if not trusted.is_file():
        return "unknown key: this store has no signing key to compare with"
    if base64.b64decode(trusted.read_text(encoding="utf-8").strip()) != public:
        return f"foreign key: signed by key {key_id(public)}, not by this store's key"
    return "valid"


def verify(run: Run) -> VerifyReport:
    """Re-hash every file the manifest lists and check its signature."""
    store, run_dir, path = run.store, run.path, run.manifest_path
    if not path.is_file():
        raise ManifestError(f"run {run.id} has no {path.name}",
                            f"Export the run first (appliance export --run {run.id}); it writes the manifest.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}", "The manifest was damaged; export again.") from exc
    signature = _check_signature(store, manifest)
    changed, missing, unavailable = [], [], []
    checked = 0
    recorded = manifest.get("files", {})
    targets = [(run_dir / rel, f"{run_dir.name}/{rel}", entry) for rel, entry in recorded.items()]
    base = (manifest.get("inputs") or {}).get("base_model")
    if base:
        folder = store.model_dir(base["name"])
        targets += [(folder / name, f"base/{base['name']}/{name}", e) for name, e in base["files"].items()]
    for file, label, entry in targets:
        checked += 1
        if not file.resolve().is_relative_to(store.root) and not label.startswith("base/"):
            changed.append(f"{label} (leads outside the run)")  # an edited manifest; never read what it points at
        elif not file.is_file():
            missing.append(label)
        elif file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
            changed.append(label)
    for item in (manifest.get("inputs") or {}).get("data", []):
        source = Path(item["path"])
        if not source.is_file():
            unavailable.append(str(source))
            continue
        checked += 1
        if sha256_file(source) != item["sha256"]:
            changed.append(str(source))
    unrecorded = [rel for rel in _covered(run_dir) if rel not in recorded]
    ok = signature == "valid" and not changed and not missing and not unrecorded
    return VerifyReport(run=run_dir.name, ok=ok, signature=signature, checked=checked, changed=changed,
                        missing=missing, unrecorded=[f"{run_dir.name}/{r}" for r in unrecorded],
                        unavailable=unavailable)

