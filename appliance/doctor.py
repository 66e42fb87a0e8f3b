"""`appliance doctor`: is this installation complete, consistent and offline?"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from importlib import metadata
from typing import Literal

from pydantic import BaseModel

from appliance import __version__, hardware, offline, toolchain
from appliance.errors import ApplianceError
from appliance.store import Store

Status = Literal["ok", "warn", "fail"]
REINSTALL = "Run ./install.sh again (add --offline DIR on an air-gapped machine)."


class Check(BaseModel):
    name: str
    status: Status
    detail: str
    hint: str = ""


class Report(BaseModel):
    checks: list[Check]
    facts: dict[str, object]

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def run(store: Store) -> Report:
    checks: list[Check] = []
    facts: dict[str, object] = {"appliance": __version__, "store": str(store.root)}

    py = platform.python_version()
    checks.append(Check(name="python", status="ok" if sys.version_info >= (3, 11) else "fail",
                        detail=f"Python {py} at {sys.executable}",
                        hint="" if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed."))
    facts["python"] = py

    gpus = []
    torch_version = _version("torch")
    if torch_version is None:
        checks.append(Check(name="torch", status="fail", detail="not installed", hint=REINSTALL))
    else:
        import torch

        cuda = torch.version.cuda
        gpus = hardware.torch_gpus()
        build = f"CUDA {cuda}" if cuda else "CPU build"
        checks.append(Check(name="torch", status="ok", detail=f"torch {torch.__version__} ({build})"))
        facts.update(torch=torch.__version__, cuda=cuda)
    if not gpus:
        gpus = hardware.nvidia_gpus()
        if gpus and torch_version is not None:
            checks.append(Check(name="gpu", status="warn",
                                detail=f"{len(gpus)} NVIDIA GPU(s) present but torch cannot use them",
                                hint="Run ./install.sh --gpu to install the CUDA build of torch."))
    for gpu in gpus:
        free = f", {gpu.memory_free_mb / 1024:.1f} GiB free" if gpu.memory_free_mb is not None else ""
        checks.append(Check(name=f"gpu {gpu.index}", status="ok",
                            detail=f"{gpu.name}, {gpu.memory_total_mb / 1024:.1f} GiB{free}"))
    if not gpus:
        checks.append(Check(name="gpu", status="ok", detail="none: training runs on the CPU (slower)"))
    facts["gpus"] = [g.model_dump() for g in gpus]

    mem = hardware.memory()
    checks.append(Check(name="memory", status="ok" if mem.total_mb >= 8000 else "warn",
                        detail=f"{mem.total_mb / 1024:.1f} GiB RAM, "
                        f"{mem.available_mb / 1024:.1f} GiB available",
                        hint="" if mem.total_mb >= 8000 else "8 GiB or more is recommended."))
    facts["memory"] = mem.model_dump()

    free_mb = hardware.disk_free_mb(store.root)
    checks.append(Check(name="store", status="ok" if free_mb >= 5000 else "warn",
                        detail=f"{store.root} ({free_mb / 1024:.1f} GiB free)",
                        hint="" if free_mb >= 5000 else "Exports need several GiB; free some disk."))
    facts["disk_free_mb"] = free_mb

    checks.extend(_backends(bool(gpus)))
    checks.extend(_toolchain(facts))
    checks.append(_entity_model(facts))

    guard = offline.is_active() and all(os.environ.get(k) == v for k, v in offline.OFFLINE_ENV.items())
    checks.append(Check(name="egress guard", status="ok" if guard else "fail",
                        detail="on: only loopback connections are allowed" if guard else "off",
                        hint="" if guard else "The CLI turns it on; report this as a bug."))

    names = [m.name for m in store.list_models()]
    default = store.catalog_entry("default")
    if default is not None and default.name not in names:
        checks.append(Check(name="default model", status="warn", detail=f"{default.name} not imported",
                            hint="appliance models import default"))
    else:
        checks.append(Check(name="models", status="ok", detail=", ".join(names) or "none"))
    facts["models"] = names
    return Report(checks=checks, facts=facts)


def _backends(has_gpu: bool) -> list[Check]:
    checks = []
    missing = [d for d in ("transformers", "peft", "trl", "accelerate", "datasets") if _version(d) is None]
    if missing:
        checks.append(Check(name="backend hf", status="fail", detail=f"missing {', '.join(missing)}",
                            hint=REINSTALL))
    else:
        checks.append(Check(name="backend hf", status="ok",
                            detail=f"transformers {_version('transformers')}, peft {_version('peft')}, "
                            f"trl {_version('trl')}"))
    unsloth = _version("unsloth")
    if unsloth and importlib.util.find_spec("unsloth_zoo") is not None:
        where = "CUDA" if has_gpu else "CPU fallback"
        checks.append(Check(name="backend unsloth", status="ok", detail=f"unsloth {unsloth} ({where})"))
    else:
        checks.append(Check(name="backend unsloth", status="warn", detail="not installed",
                            hint="Training uses the hf backend. " + REINSTALL))
    bnb = _version("bitsandbytes")
    if bnb and has_gpu:
        checks.append(Check(name="4-bit (QLoRA)", status="ok", detail=f"bitsandbytes {bnb} on CUDA"))
    else:
        detail = f"bitsandbytes {bnb}, but no CUDA GPU" if bnb else "bitsandbytes not installed"
        checks.append(Check(name="4-bit (QLoRA)", status="ok" if not has_gpu else "warn", detail=detail
                            + ": LoRA in 16/32-bit instead"))
    return checks


def _entity_model(facts: dict[str, object]) -> Check:
    """The models that find names, places and organisations in the data stage: installed, and the published ones."""
    from appliance.entities import MODELS, EntityModelError, check_model, model_dir, model_version

    try:
        for language in MODELS:
            check_model(model_dir(language), language)
    except EntityModelError as exc:
        return Check(name="entity models", status="fail", detail=exc.message, hint=exc.hint)
    facts["entity_models"] = model_version(tuple(MODELS))
    return Check(name="entity models", status="ok", detail=model_version(tuple(MODELS)))


def _toolchain(facts: dict[str, object]) -> list[Check]:
    checks = []
    try:
        runtime = toolchain.runtime_info()
        checks.append(Check(name="llama.cpp runtime", status="ok",
                            detail=f"llama-cpp-python {runtime.llama_cpp_python}, ggml {runtime.ggml}"))
        facts["runtime"] = runtime.model_dump()
    except ApplianceError as exc:
        checks.append(Check(name="llama.cpp runtime", status="fail", detail=exc.message, hint=exc.hint))
    try:
        conv = toolchain.converter_info()
        checks.append(Check(name="llama.cpp converter", status="ok",
                            detail=f"llama-cpp-python {conv.llama_cpp_python}, ggml {conv.ggml}, "
                            f"gguf-py {conv.gguf_py}"))
        facts["converter"] = conv.model_dump()
    except ApplianceError as exc:
        checks.append(Check(name="llama.cpp converter", status="fail", detail=exc.message, hint=exc.hint))
    if checks[0].status == "ok":
        checks.append(_runtime_gpu(facts))
    if all(c.status == "ok" for c in checks if c.name != "llama.cpp GPU"):
        try:
            toolchain.check_versions()
            checks.append(Check(name="toolchain match", status="ok",
                                detail="converter and runtime are one llama.cpp version"))
        except ApplianceError as exc:
            checks.append(Check(name="toolchain match", status="fail", detail=exc.message, hint=exc.hint))
    return checks


def _runtime_gpu(facts: dict[str, object]) -> Check:
    """Which backends the llama.cpp runtime has, whether it sees the GPU, and whether its CUDA is torch's."""
    backends = toolchain.runtime_backends()
    facts["runtime_backends"] = backends
    gpus = hardware.nvidia_gpus()
    if "CUDA" not in backends:
        if gpus:
            return Check(name="llama.cpp GPU", status="warn", detail=f"backends {', '.join(backends) or 'none'}: "
                         f"the runtime was built for the CPU and this machine has {len(gpus)} NVIDIA GPU(s)",
                         hint="Run ./install.sh --gpu --force to build it with CUDA (it says why where it cannot); "
                         "export checks, evaluation, chat and the endpoint then run on the GPU.")
        return Check(name="llama.cpp GPU", status="ok", detail=f"backends {', '.join(backends) or 'none'} (no GPU)")
    try:
        devices = [d for d in toolchain.runtime_devices() if d.kind in ("gpu", "igpu")]
    except ApplianceError as exc:
        return Check(name="llama.cpp GPU", status="fail", detail=exc.message, hint=exc.hint)
    runtime_cuda = toolchain.runtime_cuda()
    facts["runtime_cuda"] = runtime_cuda
    facts["runtime_devices"] = [d.model_dump() for d in devices]
    seen = "; ".join(f"{d.description} ({d.free_mb / 1024:.1f} of {d.total_mb / 1024:.1f} GiB free)"
                     for d in devices)
    if not devices:
        return Check(name="llama.cpp GPU", status="warn", detail=f"built with CUDA {runtime_cuda} but sees no GPU",
                     hint="Check the NVIDIA driver (nvidia-smi) and that it runs CUDA "
                     f"{runtime_cuda}; until then llama.cpp runs on the CPU.")
    torch_cuda = facts.get("cuda")
    if isinstance(torch_cuda, str) and runtime_cuda and torch_cuda.split(".")[0] != runtime_cuda.split(".")[0]:
        return Check(name="llama.cpp GPU", status="warn",
                     detail=f"CUDA {runtime_cuda} in llama.cpp but CUDA {torch_cuda} in torch; sees {seen}",
                     hint="Two CUDA releases in one process load two copies of the CUDA libraries and need a "
                     "driver for the newer: run ./install.sh --gpu --cuda " + torch_cuda + " --force to build the "
                     "runtime with torch's.")
    return Check(name="llama.cpp GPU", status="ok", detail=f"CUDA {runtime_cuda}, sees {seen}")
