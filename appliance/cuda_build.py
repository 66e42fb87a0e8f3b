"""The CUDA build of the llama.cpp runtime: for which GPUs, with which compiler, or why it cannot be made.

install.sh runs this file with the virtual environment's Python (the system's for --dry-run) before anything
else is installed in it, so it uses the standard library alone; the tests import it:

    python3 appliance/cuda_build.py plan [--arch LIST] [--cuda X.Y] [--toolkit-dir DIR] [--offline]

prints the CMake arguments of a CUDA build on its first line, or exits with status 3 and the reason the
runtime is built for the CPU instead on stderr. The GPUs come from `--arch` (compute capabilities: "8.6,8.9",
"86;89" or "sm_86"; for a wheelhouse that serves several cards) or else from what `nvidia-smi` reports. The
compiler is the system's CUDA toolkit (CUDACXX, CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda) or, when the
system has none, one assembled in the cache from the registry's CUDA compiler wheels (nvidia-cuda-nvcc and the
runtime, math library and header wheels of the same CUDA release): the wheels hold a whole toolkit tree but
for the links CMake's FindCUDAToolkit looks for, which `assemble_toolkit` adds.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

EXIT_CPU = 3  # `plan`: no CUDA build; the reason is on stderr
# The oldest architecture each CUDA release still compiles for, and the release each newer one needs.
OLDEST_ARCH = {11: 35, 12: 50, 13: 75}
NEWEST_NEEDS = {89: (11, 8), 90: (11, 8), 100: (12, 8), 101: (12, 8), 103: (12, 9), 110: (13, 0), 120: (12, 8),
                121: (12, 9)}
# Blackwell's consumer and workstation cards use the architecture-specific feature set ("a"), as llama.cpp's
# own default list does; it has no PTX that a later card could take.
ARCH_SPECIFIC = {100, 101, 103, 110, 120, 121}
ARCH_NAMES = {50: "Maxwell", 52: "Maxwell", 60: "Pascal", 61: "Pascal", 70: "Volta", 75: "Turing", 80: "Ampere",
              86: "Ampere", 87: "Ampere", 89: "Ada", 90: "Hopper", 100: "Blackwell", 120: "Blackwell"}


class CudaBuildError(Exception):
    """The CUDA runtime cannot be built here; the message says why and what would make it possible."""


@dataclass(frozen=True)
class Nvcc:
    path: Path
    version: tuple[int, int]
    source: str  # where it was found, in words

    @property
    def root(self) -> Path:
        return self.path.parent.parent

    @property
    def release(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"


@dataclass
class BuildPlan:
    archs: list[int]
    nvcc: Nvcc
    base_args: list[str] = field(default_factory=list)
    driver: Path | None = None  # libcuda to link when the toolkit has no stub of it; None: the toolkit's stub
    no_vmm: bool = False  # neither: ggml's CUDA memory pool without the driver's virtual memory (no libcuda link)

    def architectures(self) -> str:
        """CMAKE_CUDA_ARCHITECTURES: machine code for each card, and PTX of the newest ordinary one for cards
        that come later (the driver compiles it on first use)."""
        plain = [a for a in self.archs if a not in ARCH_SPECIFIC]
        out = []
        for arch in self.archs:
            if arch in ARCH_SPECIFIC:
                out.append(f"{arch}a-real")
            elif plain and arch == plain[-1]:
                out.append(str(arch))  # real and virtual
            else:
                out.append(f"{arch}-real")
        return ";".join(out)

    def cmake_args(self) -> list[str]:
        args = [*self.base_args, "-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={self.architectures()}",
                f"-DCMAKE_CUDA_COMPILER={self.nvcc.path}", f"-DCUDAToolkit_ROOT={self.nvcc.root}"]
        if self.driver is not None:
            args.append(f"-DCUDA_cuda_driver_LIBRARY={self.driver}")
        if self.no_vmm:
            args.append("-DGGML_CUDA_NO_VMM=ON")
        return args

    def describe(self) -> str:
        cards = ", ".join(f"sm_{a}" + (f" ({ARCH_NAMES[a]})" if a in ARCH_NAMES else "") for a in self.archs)
        driver = (" (no driver library to link here: its memory pool without virtual memory)" if self.no_vmm
                  else "")
        return f"CUDA {self.nvcc.release} for {cards}, nvcc from {self.nvcc.source}{driver}"


# -- the cards ------------------------------------------------------------------------------------


def parse_archs(text: str) -> list[int]:
    """Compute capabilities as a user writes them ("8.6", "86", "sm_86", "86-real", separated by commas,
    semicolons or spaces), as sorted unique numbers."""
    archs = set()
    for item in re.split(r"[,;\s]+", text.strip()):
        if not item:
            continue
        match = re.fullmatch(r"(?:sm_|compute_)?(\d{1,2})\.(\d)|(?:sm_|compute_)?(\d{2,3})[af]?(?:-real|-virtual)?",
                             item.strip().lower())
        if match is None:
            raise CudaBuildError(f"--arch: {item!r} is not a compute capability",
                                 'Write them as nvidia-smi prints them ("8.6") or as CMake does ("86"), e.g. '
                                 '--arch 8.6,8.9; `nvidia-smi --query-gpu=compute_cap --format=csv` shows a card\'s.')
        arch = int(match.group(1) + match.group(2)) if match.group(1) else int(match.group(3))
        if arch < 30:
            raise CudaBuildError(f"--arch: {item!r} is not a compute capability (the oldest CUDA GPU is 3.0)",
                                 "Give the card's compute capability, e.g. 8.6 for an RTX 3090.")
        archs.add(arch)
    if not archs:
        raise CudaBuildError("--arch was given no compute capability", "e.g. --arch 8.6 or --arch 8.6,8.9,12.0")
    return sorted(archs)


def archs_from_smi(output: str) -> list[int]:
    """The compute capabilities in `nvidia-smi --query-gpu=compute_cap --format=csv,noheader` output."""
    found = [line.strip() for line in output.splitlines() if re.fullmatch(r"\d+\.\d", line.strip())]
    return parse_archs(",".join(found)) if found else []


def probe_archs(timeout_s: float = 20.0) -> tuple[list[int], str]:
    """The compute capabilities of this machine's cards, and what was seen in words when there are none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], "no nvidia-smi: the NVIDIA driver is not installed"
    try:
        done = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"nvidia-smi did not answer ({exc})"
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()[:200] or f"status {done.returncode}"
        return [], f"nvidia-smi could not report the cards' compute capability ({said}; older drivers cannot)"
    archs = archs_from_smi(done.stdout)
    return archs, "" if archs else "nvidia-smi lists no GPU"


def driver_cuda(timeout_s: float = 20.0) -> tuple[int, int] | None:
    """The newest CUDA release the installed driver runs ("CUDA Version" in nvidia-smi's header)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi], capture_output=True, text=True, timeout=timeout_s, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


# -- the compiler ---------------------------------------------------------------------------------


def real_nvcc(path: Path) -> Path:
    """The nvcc binary behind `path`, which may be a link or a wrapper script (`exec .../nvcc "$@"`): the
    folder nvcc reports as its own (_HERE_) in a dry run, whose parent is the toolkit's root."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probe.cu"
        source.write_text("")
        try:
            out = subprocess.run([str(path), "-dryrun", "-c", str(source), "-o", str(Path(tmp) / "probe.o")],
                                 capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return path.resolve()
    match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if match and (Path(match.group(1).strip()) / "nvcc").is_file():
        return Path(match.group(1).strip()) / "nvcc"
    return path.resolve()


def driver_library() -> Path | None:
    """The installed NVIDIA driver's libcuda.so.1 (what ggml-cuda links when the toolkit has no stub of it)."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    match = re.search(r"libcuda\.so\.1 \(libc6,x86-64\) => (\S+)", out)
    if match and Path(match.group(1)).is_file():
        return Path(match.group(1))
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/nvidia/lib64", "/usr/lib/wsl/lib"):
        if (Path(folder) / "libcuda.so.1").is_file():
            return Path(folder) / "libcuda.so.1"
    return None


SYSTEM_LIBRARY_DIRS = (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib64"))  # where distributions put cuBLAS


def has_cublas(root: Path) -> bool:
    """Whether cuBLAS (which ggml-cuda links) is beside the toolkit, or in the system's library folders where
    distributions put it."""
    folders = [root / "lib64", root / "lib", *root.glob("targets/*/lib"), *SYSTEM_LIBRARY_DIRS]
    return any((folder / "libcublas.so").exists() for folder in folders)


def has_driver_stub(root: Path) -> bool:
    return any((root / sub / "stubs" / "libcuda.so").is_file()
               for sub in ("lib64", "lib", *(str(p.relative_to(root)) for p in root.glob("targets/*/lib"))))


def nvcc_version(path: Path) -> tuple[int, int] | None:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def find_nvcc(env: dict[str, str] | None = None) -> Nvcc | None:
    """The system's nvcc, where CMake and a CUDA user would look for it, first found first."""
    env = dict(os.environ) if env is None else env
    candidates: list[tuple[str, str | None]] = [
        ("CUDACXX", env.get("CUDACXX")),
        ("CUDA_HOME", env.get("CUDA_HOME") and str(Path(env["CUDA_HOME"]) / "bin" / "nvcc")),
        ("CUDA_PATH", env.get("CUDA_PATH") and str(Path(env["CUDA_PATH"]) / "bin" / "nvcc")),
        ("PATH", shutil.which("nvcc", path=env.get("PATH", ""))),
        ("/usr/local/cuda", "/usr/local/cuda/bin/nvcc"),
    ]
    for source, candidate in candidates:
        if not candidate or not Path(candidate).is_file():
            continue
        version = nvcc_version(Path(candidate))
        if version is not None:
            return Nvcc(real_nvcc(Path(candidate)), version, f"{source} ({candidate})")
    return None


def check_archs(archs: list[int], version: tuple[int, int]) -> None:
    """Refuse cards that this CUDA release cannot compile for, naming the release that can."""
    oldest = OLDEST_ARCH.get(version[0], min(OLDEST_ARCH.values()) if version[0] < 11 else max(OLDEST_ARCH.values()))
    for arch in archs:
        if arch < oldest:
            raise CudaBuildError(f"CUDA {version[0]}.{version[1]} no longer compiles for sm_{arch}"
                                 + (f" ({ARCH_NAMES[arch]})" if arch in ARCH_NAMES else ""),
                                 "Install a CUDA 12 toolkit and build with --cuda 12.8 for cards this old, or leave "
                                 "the card out of --arch.")
        needs = NEWEST_NEEDS.get(arch)
        if needs and version < needs:
            raise CudaBuildError(f"sm_{arch} needs CUDA {needs[0]}.{needs[1]} or newer and the toolkit is "
                                 f"{version[0]}.{version[1]}", f"Install a CUDA {needs[0]}.{needs[1]}+ toolkit, or "
                                 "build with CUDA 13 (--cuda 13.0, torch's CUDA 13 build), whose compiler comes "
                                 "from the registry's wheels.")


def wheel_requirements(release: tuple[int, int]) -> list[str]:
    """The registry's wheels that make a CUDA toolkit for llama.cpp (compiler, runtime, cuBLAS, headers). From
    CUDA 13 on they hold the whole compiler; CUDA 12's nvcc wheel holds ptxas alone (for JIT compilers)."""
    major, minor = release
    if major < 13:
        raise CudaBuildError(f"the registry has no CUDA {major}.{minor} compiler: its nvidia-cuda-nvcc-cu{major} "
                             "wheel holds ptxas alone, not nvcc",
                             f"Install the CUDA {major}.{minor} toolkit (nvcc and cuBLAS) on this machine, or build "
                             "for CUDA 13 (--cuda 13.0, with torch's CUDA 13 build), whose compiler wheels are "
                             "complete.")
    names = ["nvidia-cuda-nvcc", "nvidia-cuda-runtime", "nvidia-cuda-crt", "nvidia-nvvm", "nvidia-cuda-cccl",
             "nvidia-cublas"]
    return [f"{name}=={major}.{minor}.*" for name in names]


def assemble_toolkit(site: Path) -> Path:
    """A toolkit tree that CMake and nvcc accept, from wheels installed with `pip install --target site`.

    The CUDA 13 wheels share one tree (nvidia/cu13: bin, include, lib, nvvm); wheels that each have their own
    (nvidia/cuda_nvcc, nvidia/cuda_runtime, ..., as CUDA 12's do) are merged into site/cuda by links. Either way
    what a packaged toolkit has and the wheels lack is added: lib64 and targets/<arch>-linux pointing at lib
    and include (nvcc.profile searches there), and the unversioned library names (libcublas.so) that the
    linker and FindCUDAToolkit look for."""
    nvidia = site / "nvidia"
    trees = sorted(p for p in nvidia.iterdir() if p.is_dir() and (p / "bin" / "nvcc").is_file()) \
        if nvidia.is_dir() else []
    shared = [p for p in trees if re.fullmatch(r"cu\d+", p.name)]
    if shared:
        root = shared[-1]
    else:
        if not trees:
            raise CudaBuildError(f"no nvcc in the CUDA wheels installed at {site}",
                                 "Delete that folder and run ./install.sh --gpu again.")
        root = site / "cuda"
        root.mkdir(exist_ok=True)
        for part in sorted(p for p in nvidia.iterdir() if p.is_dir()):
            _merge(part, root)
    lib = root / "lib"
    _link(root / "lib64", "lib")
    machine = os.uname().machine
    (root / "targets" / f"{machine}-linux").mkdir(parents=True, exist_ok=True)
    _link(root / "targets" / f"{machine}-linux" / "include", "../../include")
    _link(root / "targets" / f"{machine}-linux" / "lib", "../../lib")
    for versioned in sorted(lib.glob("lib*.so.*")):
        plain = lib / (versioned.name.split(".so.")[0] + ".so")
        if not plain.exists():
            _link(plain, versioned.name)
    for tool in [*(root / "bin").glob("*"), *(root / "nvvm" / "bin").glob("*")]:
        if tool.is_file() and not tool.name.endswith(".profile"):
            tool.chmod(tool.stat().st_mode | 0o111)  # a wheel's unpacking may drop the executable bits
    return root


def _link(path: Path, target: str) -> None:
    if not path.exists() and not path.is_symlink():
        path.symlink_to(target)


def _merge(src: Path, dst: Path) -> None:
    """Link every entry of src into dst, descending where both have a folder of the same name."""
    for entry in src.iterdir():
        if entry.name.endswith(".dist-info") or entry.name == "__pycache__" or entry.name == "__init__.py":
            continue
        target = dst / entry.name
        if not target.exists() and not target.is_symlink():
            target.symlink_to(entry.resolve())
        elif entry.is_dir() and target.is_dir():
            if target.is_symlink():  # a folder another wheel linked whole: make it a real one holding both
                previous = target.resolve()
                target.unlink()
                target.mkdir()
                _merge(previous, target)
            _merge(entry, target)


def install_toolkit(release: tuple[int, int], into: Path, find_links: Path | None = None,
                    python: str = sys.executable) -> Nvcc:
    """Install the registry's CUDA compiler wheels of `release` into `into` (or reuse them) and assemble them."""
    site = into / f"cuda-{release[0]}.{release[1]}"
    done = site / ".assembled"
    if not done.is_file():
        shutil.rmtree(site, ignore_errors=True)
        source = ["--no-index", "--find-links", str(find_links)] if find_links else []
        command = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", str(site),
                   *source, *wheel_requirements(release)]
        done_run = subprocess.run(command, capture_output=True, text=True, check=False)
        if done_run.returncode != 0:
            shutil.rmtree(site, ignore_errors=True)
            tail = (done_run.stderr or done_run.stdout).strip().splitlines()[-3:]
            raise CudaBuildError(f"could not install the CUDA {release[0]}.{release[1]} compiler wheels: "
                                 + " / ".join(tail), "Install a CUDA toolkit (nvcc) on this machine, or run the "
                                 "install on a connected machine with --wheelhouse and carry the wheelhouse here.")
        assemble_toolkit(site)
        done.write_text("ok\n")
    root = assemble_toolkit(site)
    version = nvcc_version(root / "bin" / "nvcc")
    if version is None:
        raise CudaBuildError(f"the nvcc assembled at {root} does not run", f"Delete {site} and run the install again.")
    return Nvcc(root / "bin" / "nvcc", version, f"the registry's CUDA {version[0]}.{version[1]} wheels ({site})")


# -- the decision ---------------------------------------------------------------------------------


def plan(arch_option: str | None, cuda_option: str | None, toolkit_dir: Path | None, offline: bool,
         base_args: list[str], env: dict[str, str] | None = None, find_links: Path | None = None,
         fetch: bool = True) -> BuildPlan:
    """The CUDA build for this machine's cards (or `arch_option`'s), or CudaBuildError saying why none.
    `fetch=False` (a dry run) installs no compiler wheels: the plan names the nvcc they would give."""
    if arch_option:
        archs = parse_archs(arch_option)
    else:
        archs, seen = probe_archs()
        if not archs and seen.startswith("nvidia-smi could not"):
            raise CudaBuildError(f"the cards to build for are not known: {seen}",
                                 "Name their compute capabilities (nvidia-smi -q shows them, or the card's "
                                 "specification): --cuda-arch 8.6.")
        if not archs:
            raise CudaBuildError(f"no NVIDIA GPU is visible here ({seen}), so there is no card to build the CUDA "
                                 "runtime for", "To build it for cards elsewhere (a wheelhouse for another machine), "
                                 "name their compute capabilities: --arch 8.6,8.9.")
    wanted = _release(cuda_option) if cuda_option else None
    nvcc = find_nvcc(env)
    system = "no CUDA compiler (nvcc) on this machine"
    if nvcc is not None and wanted is not None and nvcc.version[0] != wanted[0]:
        system = f"the CUDA toolkit here is {nvcc.release} ({nvcc.root}), not {wanted[0]}.{wanted[1]}"
        nvcc = None
    if nvcc is not None and not has_cublas(nvcc.root):
        system = f"the CUDA toolkit here ({nvcc.root}, {nvcc.release}) has no cuBLAS, which ggml-cuda links"
        nvcc = None
    if nvcc is not None:
        try:
            check_archs(archs, nvcc.version)
        except CudaBuildError as exc:
            system = f"the CUDA toolkit here ({nvcc.root}) cannot build for these cards: {exc.args[0]}"
            nvcc = None
    if nvcc is None:
        release = wanted or driver_cuda()
        if release is None:
            raise CudaBuildError(f"{system}, and no CUDA release to fetch a compiler for",
                                 "Install a CUDA toolkit, or give --cuda 13.0 to take nvcc from the registry's "
                                 "wheels.")
        if offline and find_links is None:
            raise CudaBuildError(f"{system}, and an offline install cannot fetch one",
                                 "Make the wheelhouse with --gpu on a connected machine: it carries the CUDA build.")
        into = toolkit_dir or Path.home() / ".cache" / "appliance"
        try:
            wheel_requirements(release)  # a release whose compiler the registry does not have
        except CudaBuildError as exc:
            raise CudaBuildError(f"{system}, and {exc.args[0]}", exc.args[1]) from exc
        if fetch:
            nvcc = install_toolkit(release, into, find_links)
        else:
            site = into / f"cuda-{release[0]}.{release[1]}"
            root = site / "nvidia" / f"cu{release[0]}"
            nvcc = Nvcc(root / "bin" / "nvcc", release, f"the registry's CUDA {release[0]}.{release[1]} wheels "
                        f"(to be installed into {site})")
    check_archs(archs, nvcc.version)
    driver = driver_cuda() if not arch_option else None  # for this machine's cards, its driver must run it
    if driver is not None and driver[0] < nvcc.version[0]:
        raise CudaBuildError(f"the NVIDIA driver here runs CUDA up to {driver[0]}.{driver[1]}, so a CUDA "
                             f"{nvcc.release} runtime would not start on its cards",
                             f"Update the driver to one for CUDA {nvcc.release}, or install torch's and the "
                             f"runtime's CUDA {driver[0]} builds (--cuda {driver[0]}.{driver[1]}).")
    build = BuildPlan(archs, nvcc, base_args)
    if not has_driver_stub(nvcc.root):
        build.driver = driver_library()
        build.no_vmm = build.driver is None
    return build


def _release(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?", text.strip())
    if match is None:
        raise CudaBuildError(f"--cuda: {text!r} is not a CUDA release", "e.g. --cuda 12.8 or --cuda 13.0")
    return int(match.group(1)), int(match.group(2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cuda_build.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="print the CMake arguments of the CUDA build, or why there is none")
    p.add_argument("--arch", help="compute capabilities to build for (default: this machine's cards)")
    p.add_argument("--cuda", help="CUDA release of the compiler wheels when the system has no nvcc")
    p.add_argument("--toolkit-dir", type=Path, help="where the compiler wheels are installed (the install's cache)")
    p.add_argument("--find-links", type=Path, help="take the compiler wheels from this folder only")
    p.add_argument("--offline", action="store_true", help="never fetch compiler wheels")
    p.add_argument("--base", default="", help="the CPU build's CMake arguments, kept in front (--base=...)")
    p.add_argument("--dry-run", action="store_true", help="install no compiler wheels; say what would be used")
    args = parser.parse_args(argv)
    try:
        build = plan(args.arch, args.cuda, args.toolkit_dir, args.offline, args.base.split(),
                     find_links=args.find_links, fetch=not args.dry_run)
    except CudaBuildError as exc:
        hint = exc.args[1] if len(exc.args) > 1 else ""
        print(f"{exc.args[0]}{'. ' + hint if hint else ''}", file=sys.stderr)
        return EXIT_CPU
    print(" ".join(build.cmake_args()))
    print(build.describe())
    print(f"cuda={build.nvcc.release} archs={';'.join(str(a) for a in build.archs)} root={build.nvcc.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
