"""The version-locked llama.cpp toolchain: converter, gguf-py, quantizer and runtime.

install.sh builds the runtime (llama-cpp-python) from one pinned source archive and copies the
converter and its own gguf-py from that same archive into `<venv>/share/appliance/llama.cpp`,
with a `toolchain.json` naming the versions. Here we find those pieces, check that they are one
llama.cpp version, and run them. Nothing is fetched and nothing is compiled at export time.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel

from appliance.errors import ToolchainError

TOOLCHAIN_FILE = "toolchain.json"
REINSTALL_HINT = "Run ./install.sh again; it rebuilds the toolchain from the pinned archive."


class ConverterInfo(BaseModel):
    llama_cpp_python: str
    ggml: str
    gguf_py: str
    source: str
    source_sha256: str
    path: str


class RuntimeInfo(BaseModel):
    llama_cpp_python: str
    ggml: str
    system_info: str = ""
    path: str


def toolchain_dir() -> Path:
    env = os.environ.get("APPLIANCE_TOOLCHAIN")
    return Path(env) if env else Path(sys.prefix) / "share" / "appliance" / "llama.cpp"


def converter_info() -> ConverterInfo:
    folder = toolchain_dir()
    manifest = folder / TOOLCHAIN_FILE
    if not manifest.is_file():
        raise ToolchainError(f"no llama.cpp converter at {folder}", REINSTALL_HINT)
    data = json.loads(manifest.read_text(encoding="utf-8"))
    for required in ("convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py", "conversion"):
        if not (folder / required).exists():
            raise ToolchainError(f"the converter at {folder} lacks {required}", REINSTALL_HINT)
    return ConverterInfo(path=str(folder), **data)


def runtime_info() -> RuntimeInfo:
    """Versions of the installed llama.cpp runtime, read without importing llama_cpp."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ToolchainError("llama-cpp-python is not installed", REINSTALL_HINT)
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    lib_dir = package_dir / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.so*")) + sorted(lib_dir.glob("libggml.so*"))
    if not candidates:
        raise ToolchainError(f"no ggml library in {lib_dir}", REINSTALL_HINT)
    try:
        lib = ctypes.CDLL(str(candidates[0]))
        lib.ggml_version.restype = ctypes.c_char_p
        ggml_version = lib.ggml_version().decode()
    except (OSError, AttributeError) as exc:
        raise ToolchainError(f"cannot load {candidates[0]}: {exc}", REINSTALL_HINT) from exc
    return RuntimeInfo(
        llama_cpp_python=metadata.version("llama_cpp_python"),
        ggml=ggml_version,
        path=str(package_dir),
    )


BACKEND_LIBRARIES = {"cpu": "CPU", "cuda": "CUDA", "vulkan": "Vulkan", "metal": "Metal", "hip": "ROCm",
                     "sycl": "SYCL", "blas": "BLAS", "opencl": "OpenCL"}


def _runtime_lib_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _runtime_library(pattern: str) -> Path | None:
    """The installed runtime's library matching `pattern` (libggml-cuda.so*), None when it has none."""
    lib_dir = _runtime_lib_dir()
    if lib_dir is None or not lib_dir.is_dir():
        return None
    return next(iter(sorted(lib_dir.glob(pattern))), None)


def _recorded_cuda() -> str | None:
    """The CUDA release install.sh recorded for the runtime it built (toolchain.json), None when it recorded none."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        recorded = json.loads((toolchain_dir() / TOOLCHAIN_FILE).read_text(encoding="utf-8")).get("runtime_cuda")
        return str(recorded) if recorded else None
    return None


def runtime_backends() -> list[str]:
    """The ggml backends the installed runtime was built with (CPU, CUDA, ...), read from its libraries without
    loading them."""
    lib_dir = _runtime_lib_dir()
    if lib_dir is None or not lib_dir.is_dir():
        return []
    found = []
    for name, label in BACKEND_LIBRARIES.items():
        if any(lib_dir.glob(f"libggml-{name}.so*")):
            found.append(label)
    return found


CUDA_LIBRARIES = ("cudart", "cublasLt", "cublas")


def preload_cuda() -> list[str]:
    """Load the CUDA libraries a CUDA runtime needs from the CUDA wheels beside it (torch's own: nvidia/cu13/lib,
    nvidia/cublas/lib, ...), before `import llama_cpp`, so that it loads without LD_LIBRARY_PATH on a machine
    whose CUDA comes from those wheels alone (an offline install from a wheelhouse). Does nothing for a CPU
    runtime or where the system's libraries are found anyway; returns the files it loaded."""
    global _preloaded
    if _preloaded is not None:
        return _preloaded
    _preloaded = []
    cuda_lib = _runtime_library("libggml-cuda.so*")
    if cuda_lib is None:
        return _preloaded
    wanted = {name: major for name, major in _needed_cuda(cuda_lib)}
    recorded = _recorded_cuda()
    if not wanted and recorded:  # names not found where they were looked for: the release install.sh recorded
        wanted = dict.fromkeys(CUDA_LIBRARIES, recorded.split(".")[0])
    for name in CUDA_LIBRARIES:
        if name not in wanted:
            continue
        for folder in _wheel_lib_dirs():
            candidate = folder / f"lib{name}.so.{wanted[name]}"
            if candidate.is_file():
                with contextlib.suppress(OSError):
                    ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
                    _preloaded.append(str(candidate))
                break
    return _preloaded


_preloaded: list[str] | None = None


def _needed_cuda(library: Path) -> list[tuple[str, str]]:
    """(name, major) of the CUDA libraries `library` was linked against, from the names in its dynamic string
    table (near the start of the file, in the first loaded segment: the kernels after it are not read)."""
    try:
        with library.open("rb") as handle:
            data = handle.read(8 * 1024 * 1024)
    except OSError:
        return []
    found = {(m.group(1).decode(), m.group(2).decode())
             for m in re.finditer(rb"lib(cudart|cublasLt|cublas)\.so\.(\d+)\x00", data)}
    return sorted(found)


def _wheel_lib_dirs() -> list[Path]:
    """The library folders of the NVIDIA wheels on this interpreter's path."""
    folders = []
    for entry in sys.path:
        nvidia = Path(entry or ".") / "nvidia"
        if nvidia.is_dir():
            folders += sorted(p / "lib" for p in nvidia.iterdir() if (p / "lib").is_dir())
    return folders


class Device(BaseModel):
    name: str
    description: str
    kind: str  # cpu, gpu, igpu, accel
    free_mb: int
    total_mb: int


DEVICE_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


def runtime_devices() -> list[Device]:
    """The devices the installed runtime's ggml sees (the CPU, and each GPU a CUDA build can use), asked from its
    own library: what llama.cpp will offload to, whatever torch or nvidia-smi say."""
    library = _runtime_library("libggml.so*")
    if library is None:
        raise ToolchainError("llama-cpp-python is not installed", REINSTALL_HINT)
    preload_cuda()
    try:
        lib = ctypes.CDLL(str(library))
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
            getattr(lib, name).restype = ctypes.c_char_p
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.ggml_backend_dev_type.restype = ctypes.c_int
        lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        size_p = ctypes.POINTER(ctypes.c_size_t)
        lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, size_p, size_p]
        devices = []
        for index in range(lib.ggml_backend_dev_count()):
            dev = lib.ggml_backend_dev_get(index)
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            devices.append(Device(name=lib.ggml_backend_dev_name(dev).decode(errors="replace"),
                                  description=lib.ggml_backend_dev_description(dev).decode(errors="replace"),
                                  kind=DEVICE_KINDS.get(lib.ggml_backend_dev_type(dev), "other"),
                                  free_mb=free.value // 2**20, total_mb=total.value // 2**20))
    except (OSError, AttributeError) as exc:
        raise ToolchainError(f"cannot ask {library} for its devices: {exc}", REINSTALL_HINT) from exc
    return devices


def runtime_cuda() -> str | None:
    """The CUDA release the runtime was built with ("13.0"; the major alone when install.sh did not record it),
    None for a runtime without CUDA."""
    cuda_lib = _runtime_library("libggml-cuda.so*")
    if cuda_lib is None:
        return None
    recorded = _recorded_cuda()
    if recorded:
        return recorded
    majors = {major for name, major in _needed_cuda(cuda_lib) if name == "cudart"}
    return next(iter(majors), "unknown")


def check_versions() -> tuple[ConverterInfo, RuntimeInfo]:
    """Both halves of the toolchain, raising unless they come from one llama.cpp version."""
    converter, runtime = converter_info(), runtime_info()
    if (converter.llama_cpp_python, converter.ggml) != (runtime.llama_cpp_python, runtime.ggml):
        raise ToolchainError(
            f"converter is llama-cpp-python {converter.llama_cpp_python} (ggml {converter.ggml}) "
            f"but the runtime is {runtime.llama_cpp_python} (ggml {runtime.ggml})",
            "A GGUF written by one llama.cpp and read by another can misbehave. " + REINSTALL_HINT,
        )
    return converter, runtime


def _python() -> list[str]:
    """The interpreter a converter script runs in: this one, without the libraries it never uses (unused.py)."""
    return [sys.executable, "-m", "appliance.unused"]


PRE_TOKENIZER_SCRIPT = Path(__file__).with_name("convert_with_pre.py")
UNRECOGNISED_PRE = "BPE pre-tokenizer was not recognized"  # the converter's words


def convert_command(model_dir: Path, outfile: Path, outtype: str = "f16",
                    pre_tokenizer: str | None = None) -> list[str]:
    """The converter's command line; with `pre_tokenizer`, run through convert_with_pre.py, which names the BPE
    pre-tokenizer of a tokenizer the converter does not recognise."""
    converter = toolchain_dir() / "convert_hf_to_gguf.py"
    script = [str(PRE_TOKENIZER_SCRIPT), pre_tokenizer, str(converter)] if pre_tokenizer else [str(converter)]
    return [*_python(), *script, str(model_dir), "--outfile", str(outfile), "--outtype", outtype]


def converter_env() -> dict[str, str]:
    """The converter must import its own gguf-py, never the PyPI `gguf` (another code base)."""
    env = dict(os.environ)
    gguf_py = str(toolchain_dir() / "gguf-py")
    env["PYTHONPATH"] = gguf_py + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("NO_LOCAL_GGUF", None)  # that switch would make the converter skip its gguf-py
    return env


def convert_to_gguf(model_dir: Path, outfile: Path, outtype: str = "f16", log: Path | None = None,
                    pre_tokenizer: str | None = None) -> None:
    """Convert a Hugging Face folder to GGUF with the installed converter (written atomically)."""
    _run_converter(lambda tmp: convert_command(model_dir, tmp, outtype, pre_tokenizer), outfile,
                   f"converting {model_dir}", log,
                   "The model may use an architecture this llama.cpp version cannot convert.")


def convert_lora(adapter_dir: Path, base_dir: Path, outfile: Path, outtype: str = "f16",
                 log: Path | None = None) -> None:
    """Convert a PEFT LoRA adapter to a GGUF adapter for llama.cpp (written atomically)."""
    def command(tmp: Path) -> list[str]:
        return [*_python(), str(toolchain_dir() / "convert_lora_to_gguf.py"), "--base", str(base_dir),
                "--outfile", str(tmp), "--outtype", outtype, str(adapter_dir)]

    _run_converter(command, outfile, f"converting the adapter {adapter_dir}", log,
                   "llama.cpp converts LoRA adapters of the architectures its converter knows; merge instead.")


_DISK_FULL = ("No space left on device", "File too large", "Disk quota exceeded")
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile when the disk fills up


def _out_of_space(output: str, partial: Path) -> bool:
    """Whether a failed write ran out of disk, or into the file-size limit (ulimit -f)."""
    if any(marker in output for marker in _DISK_FULL) or _SHORT_WRITE.search(output):
        return True
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        size = partial.stat().st_size
        free = shutil.disk_usage(partial.parent).free
    except OSError:
        return False
    return free < 2**20 or (limit != resource.RLIM_INFINITY and size >= limit - 2**20)


def _run_converter(command: Callable[[Path], list[str]], outfile: Path, doing: str, log: Path | None,
                   hint: str) -> None:
    converter_info()
    tmp = outfile.with_name(f".{outfile.name}.partial")
    outfile.parent.mkdir(parents=True, exist_ok=True)
    try:
        warm = _warm.convert(command(tmp)[len(_python()):]) if _warm is not None else None
        if warm is None:
            done = subprocess.run(command(tmp), env=converter_env(), capture_output=True, text=True, check=False)
            returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
        else:
            returncode, stdout, stderr = warm
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if log is not None:
        log.write_text(stdout + stderr, encoding="utf-8")
    if returncode != 0:
        output = stderr or stdout
        full = _out_of_space(output, tmp)
        tmp.unlink(missing_ok=True)
        tail = "\n".join(output.strip().splitlines()[-5:])
        if full:
            raise ToolchainError(f"{doing} to GGUF failed: the disk is full (or a file-size limit was hit)",
                                 "Free space in the store's disk (df -h shows it) and export again; the partial "
                                 "file was removed.")
        if UNRECOGNISED_PRE in output:
            hint = ("llama.cpp's converter does not recognise this BPE tokenizer's pre-tokenizer (a tokenizer "
                    "retrained or changed from its family's). Export again with --pre-tokenizer NAME, the name of "
                    "the family it splits text like (llama-bpe for Llama 3, qwen2 for Qwen2.5, smollm, ...): the "
                    "verification gate then checks that llama.cpp tokenizes as the model does.")
        raise ToolchainError(f"{doing} to GGUF failed (exit {returncode}):\n{tail}", hint)
    os.replace(tmp, outfile)


class WarmConverter:
    """A process forked from a job before the job computes anything, with the converter's libraries (torch,
    transformers, llama.cpp's gguf-py and conversion package) imported once, that runs each conversion asked
    of it in a child of its own: a conversion then starts in a fraction of a second instead of paying the
    converter's imports again (about 8 s on 2 cores).

    Forking is safe at that point because the job has only imported libraries: no thread pool has run yet
    (an OpenMP pool that has run does not survive a fork). The process closes every file the job had open
    (the job's lock among them), dies with the job (PR_SET_PDEATHSIG), and so do the conversions it runs: a
    killed export leaves no converter behind. Each conversion runs as `python -m appliance.unused SCRIPT`
    would, with its output in a file that is read back as a subprocess's would be."""

    def __init__(self) -> None:
        import gc

        import torch  # noqa: F401  # imported before the fork, once for both processes
        from transformers import AutoConfig, AutoTokenizer  # noqa: F401

        gc.collect()  # no garbage of the job's is left for the forked process to finalize
        commands, self._commands = os.pipe()
        self._results, results = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover (the forked process: it never returns)
            try:
                os.close(self._commands)
                os.close(self._results)
                _serve_conversions(commands, results)
            finally:
                os._exit(0)
        os.close(commands)
        os.close(results)
        self._reader = os.fdopen(self._results, "r", encoding="utf-8")

    def convert(self, argv: list[str]) -> tuple[int, str, str] | None:
        """Run the converter `argv` (script and arguments): exit status, output, and '' (the output holds both
        streams); None when the warm process is gone (the caller then starts a converter of its own)."""
        import tempfile

        with tempfile.NamedTemporaryFile("w+", encoding="utf-8", prefix="convert-", suffix=".log") as output:
            try:
                os.write(self._commands, (json.dumps({"argv": argv, "output": output.name}) + "\n").encode())
                line = self._reader.readline()
            except OSError:
                return None
            if not line:
                return None
            status = int(json.loads(line)["status"])
            output.seek(0)
            return status, output.read(), ""

    def close(self) -> None:
        with _suppress_os_error():
            os.close(self._commands)  # the warm process reads the end of its commands and exits
        with _suppress_os_error():
            self._reader.close()
        with _suppress_os_error():
            os.waitpid(self.pid, 0)


def _suppress_os_error() -> contextlib.suppress:
    return contextlib.suppress(OSError, ChildProcessError)


def _die_with_parent() -> None:
    parent = os.getppid()
    with _suppress_os_error():
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the signal was asked for
        os._exit(1)


def _serve_conversions(commands: int, results: int) -> None:  # pragma: no cover (runs in the forked process)
    from appliance import unused

    _die_with_parent()
    low, high = sorted((commands, results))
    os.closerange(3, low)  # the job's files, its lock among them: the job's alone
    os.closerange(low + 1, high)
    os.closerange(high + 1, 1 << 20)
    os.environ.update({k: v for k, v in converter_env().items() if k == "PYTHONPATH"})
    os.environ.pop("NO_LOCAL_GGUF", None)
    folder = toolchain_dir()
    for name in [m for m in sys.modules if m == "gguf" or m.startswith("gguf.")]:
        del sys.modules[name]  # the registry's gguf, should the job have read a header with it: not the converter's
    sys.path[:0] = [str(folder), str(folder / "gguf-py")]
    try:
        importlib.import_module("gguf")  # llama.cpp's gguf-py, from the converter's folder
        importlib.import_module("conversion")  # the converter's own package: imported once, here
    except Exception:  # noqa: BLE001 (each conversion then imports what it needs and reports what fails)
        pass
    reader = os.fdopen(commands, "r", encoding="utf-8")
    for line in reader:
        request = json.loads(line)
        child = os.fork()
        if child == 0:
            code = 1
            try:
                _die_with_parent()
                for signum in (signal.SIGTERM, signal.SIGINT):  # the job's handlers only set its cancel flag
                    signal.signal(signum, signal.SIG_DFL)
                out = os.open(request["output"], os.O_WRONLY | os.O_TRUNC)
                os.dup2(out, 1)
                os.dup2(out, 2)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                try:
                    unused.run_script(request["argv"])
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                except BaseException:  # noqa: BLE001 (reported as the converter's own failure would be)
                    import traceback

                    traceback.print_exc()
            finally:
                with _suppress_os_error():
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        _pid, wait_status = os.waitpid(child, 0)
        status = os.waitstatus_to_exitcode(wait_status)
        os.write(results, (json.dumps({"status": status}) + "\n").encode())


_warm: WarmConverter | None = None


@contextlib.contextmanager
def warm_converter() -> Iterator[None]:
    """A context in which this process's conversions run in a warm converter process (see `WarmConverter`).
    Enter it only in a job's own process and before it computes anything: it forks."""
    global _warm
    if _warm is not None or os.name != "posix":
        yield
        return
    try:
        _warm = WarmConverter()
    except OSError:  # no fork (out of memory, a process limit): each conversion starts its own process
        yield
        return
    try:
        yield
    finally:
        warm, _warm = _warm, None
        warm.close()


QUANT_TYPES = ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")


def quantize(src: Path, dst: Path, quant: str, threads: int = 0) -> None:
    """Quantize a GGUF with the installed runtime's own quantizer (written atomically)."""
    preload_cuda()
    import llama_cpp

    quant = quant.upper()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}", None)
    if quant not in QUANT_TYPES or ftype is None:
        raise ToolchainError(f"unknown quantization {quant!r}", f"Choose one of {', '.join(QUANT_TYPES)}.")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    tmp = dst.with_name(f".{dst.name}.partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(dst.parent).free
        if free < src.stat().st_size:
            raise ToolchainError(f"quantizing {src.name} to {quant} failed: only {free / 2**20:.0f} MiB free",
                                 "Free space in the store's disk and export again; the partial file was removed.")
        raise ToolchainError(f"quantizing {src.name} to {quant} failed (code {rc})",
                             "The disk may be full or a file-size limit set (ulimit -f); otherwise " + REINSTALL_HINT)
    os.replace(tmp, dst)
