"""Keep libraries that a job never uses from loading, so that a job starts seconds sooner.

transformers and peft import optional integrations as soon as they find them installed, whether
or not anything calls them: scikit-learn (assisted decoding's confidence threshold), SciPy (the
loss functions of object-detection models), bitsandbytes (4-bit layers) and torchao (another
quantizer). They are installed here for other reasons (the sentence encoder's package, Unsloth)
and cost about 4 s of every job's start on a 2-core machine, out of 12. A module set to None in
`sys.modules` is what Python's import system reads as "not installed": `importlib.util.find_spec`
answers None, so the libraries take their documented path without it.

4-bit and torchao are kept wherever they can be used: on a host with an NVIDIA driver, and in a
training job that asks for Unsloth (its CPU fallback imports both). llama.cpp's converters run
through `python -m appliance.unused SCRIPT ARGS` for the same reason: they load a model's
configuration through transformers, which imports all of the above.
"""

from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path
from typing import Any

NEVER_USED = ("sklearn", "scipy")  # no code path of a job calls them
GPU_ONLY = ("bitsandbytes", "torchao")  # 4-bit QLoRA and Unsloth: CUDA, or an explicit Unsloth training


def unused(stage: str, config: dict[str, Any]) -> tuple[str, ...]:
    """The top-level modules a job of `stage` with `config` never uses on this host."""
    if shutil.which("nvidia-smi") is not None:
        return NEVER_USED
    if stage == "train" and config.get("backend") == "unsloth":
        return NEVER_USED
    return NEVER_USED + GPU_ONLY


def keep_out(modules: tuple[str, ...]) -> None:
    """Make `modules` read as not installed in this process; one already imported is left alone."""
    for name in modules:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None is import's "not installed" mark


def run_script(argv: list[str]) -> None:
    """Run the Python script `argv[0]` with arguments `argv[1:]` as `python SCRIPT ARGS` would (its folder first
    on the path), with the never-used modules kept out."""
    script = Path(argv[0]).resolve()
    keep_out(NEVER_USED)
    sys.argv = [str(script), *argv[1:]]
    sys.path[0] = str(script.parent)
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m appliance.unused SCRIPT [ARGS...]")
    run_script(sys.argv[1:])
