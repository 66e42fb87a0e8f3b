#!/usr/bin/env bash
# Gather, on a connected machine, what the lent GPU machine lacks (it has python3 with torch+CUDA, transformers and
# peft) into bench/gpu/wheels/, which a call carries beside the tree (at most 64 MiB: this script fails above it):
#   - bitsandbytes, unsloth and unsloth_zoo (+ tyro, msgspec, cut_cross_entropy), slimmed: Unsloth's studio/ web
#     app (60 of its 88 MB) and the CUDA libraries of other CUDA versions inside bitsandbytes are dropped;
#   - what the appliance's CLI and jobs load in bench/gpu/check.py's steps (traced on its dry run) beyond torch,
#     transformers and peft, which such an image may lack: typer and rich, pydantic, gguf, cryptography (the
#     manifest's signature), diskcache (llama-cpp-python's), trl and datasets (Unsloth's); at the versions of
#     this checkout's .venv, for the GPU machine's Python (binary wheels: manylinux x86_64). pyarrow and pandas,
#     which datasets needs, are too big to carry: the image must have them for Unsloth;
#   - llama-cpp-python at the pinned version: the CUDA wheel in bench/gpu/llama-cuda/ when one was built before
#     (check.sh --build-cuda brings it back in $OUT), else this machine's portable CPU build (install.sh's), slimmed
#     to the libraries llama_cpp loads;
#   - kit/: the default model's tokenizer, the sample prepared by `appliance data prepare`, and the converter
#     and gguf-py of the pinned llama.cpp (.venv/share/appliance/llama.cpp), none of which that machine has;
#   - with --sdist: the pinned llama-cpp-python source archive, slimmed (no vocab GGUFs, docs, git pack), for
#     `check.sh --build-cuda`.
#
#   bash bench/gpu/prepare_wheels.sh [--cuda 128] [--python 3.12] [--sdist]
# then on the GPU machine, in one call (bench/gpu/check.sh says more):
#   bash bench/gpu/check.sh                 # or: pip install --no-deps bench/gpu/wheels/*.whl && python bench/gpu/qlora_compare.py
set -euo pipefail
cd "$(dirname "$0")"
repo="$(cd ../.. && pwd)"
PY="$repo/.venv/bin/python"
[ -x "$PY" ] || { echo "prepare_wheels.sh: no $PY; run ./install.sh first" >&2; exit 2; }
cuda=128
pyver=3.12
sdist=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) cuda="${2:?--cuda needs a version such as 128}"; shift ;;
    --python) pyver="${2:?--python needs a version such as 3.12}"; shift ;;
    --sdist) sdist=1 ;;
    [0-9]*) cuda="$1" ;;  # the old positional form
    *) echo "prepare_wheels.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
limit=$((64 * 1024 * 1024))
out=wheels
rm -rf "$out" .work && mkdir -p "$out/kit" .work/gpu .work/deps

pinned() {  # NAME... -> NAME==VERSION as installed in this checkout's .venv
  "$PY" - "$@" <<'EOF'
import importlib.metadata as m, sys
print(" ".join(f"{name}=={m.version(name)}" for name in sys.argv[1:]))
EOF
}

slim() {  # WHEEL: unpack, drop what the GPU machine never loads, pack into $out
  local wheel="$1" dir root
  dir=".work/unpacked/$(basename "${wheel%.whl}")"
  "$PY" -m wheel unpack -d "$dir" "$wheel" >/dev/null
  root=$(ls -d "$dir"/*/ | head -n 1)
  rm -rf "$root"/studio "$root"/unsloth/studio "$root"/lib "$root"/include "$root"/bin
  find "$root" -name 'libbitsandbytes_cuda*.so' ! -name "libbitsandbytes_cuda${cuda}.so" -delete
  find "$root" -path '*llama_cpp/lib/*.so.*.*' -delete  # llama_cpp loads libX.so, which needs libX.so.0
  rm -rf "$root"/cmake/data/bin/ctest "$root"/cmake/data/bin/cpack "$root"/cmake/data/share/cmake-*/Help \
    "$root"/cmake/data/share/vim "$root"/cmake/data/share/emacs  # a build needs cmake and its modules alone
  "$PY" -m wheel pack -d "$out" "$root" >/dev/null
}

echo "bitsandbytes and Unsloth" >&2
"$PY" -m pip download --quiet --no-deps -d .work/gpu bitsandbytes==0.50.2 unsloth==2026.10.9 unsloth_zoo==2026.10.9 \
  cut_cross_entropy
for wheel in .work/gpu/*.whl; do slim "$wheel"; done

echo "the appliance CLI's dependencies, for Python $pyver" >&2
# shellcheck disable=SC2046  # one word per requirement
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out" \
  $(pinned typer click shellingham rich markdown-it-py mdurl pygments pydantic pydantic-core annotated-types \
    typing-inspection annotated-doc PyYAML psutil gguf cryptography cffi pycparser diskcache trl datasets dill \
    multiprocess xxhash tyro msgspec)

echo "llama-cpp-python" >&2
version="$(pinned llama-cpp-python)"
version="${version#*==}"
llama=$(ls llama-cuda/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n 1 || true)
[ -n "$llama" ] || llama=$(ls "${APPLIANCE_CACHE:-$HOME/.cache/appliance}"/wheels/llama_cpp_python-"$version"-*.whl \
                             2>/dev/null | head -n 1 || true)
if [ -n "$llama" ]; then
  echo "  from $llama" >&2
  slim "$llama"
else
  echo "  none: no bench/gpu/llama-cuda/ wheel and no install.sh build; export and decode will be skipped there" >&2
fi

echo "kit: tokenizer, prepared sample, converter" >&2
base="$repo/models/base/smollm2-135m-instruct"
[ -f "$base/tokenizer.json" ] || base="${APPLIANCE_HOME:-$repo/models}/base/smollm2-135m-instruct"
[ -f "$base/tokenizer.json" ] || { echo "prepare_wheels.sh: the default model is not imported; run ./install.sh" >&2; exit 2; }
mkdir -p "$out/kit/tokenizer"
for file in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja generation_config.json; do
  [ -f "$base/$file" ] && cp "$base/$file" "$out/kit/tokenizer/"
done
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/base" && ln -s "$base" "$scratch/base/smollm2-135m-instruct"
run=$(cd "$repo" && APPLIANCE_HOME="$scratch" APPLIANCE_JOB_HOST=0 "$PY" -m appliance data prepare \
      appliance/data/samples/helpdesk.csv --task classification --label-field category --no-near-dup \
      --pii-entities "" --json | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["run"])')
cp -r "$scratch/runs/$run/data" "$out/kit/data"
cp -r "$repo/.venv/share/appliance/llama.cpp" "$out/kit/llama.cpp"
find "$out/kit" -name __pycache__ -prune -exec rm -rf {} +

if [ "$sdist" = 1 ]; then
  echo "the pinned llama-cpp-python source archive, slimmed" >&2
  archive="${APPLIANCE_CACHE:-$HOME/.cache/appliance}/llama_cpp_python-$version.tar.gz"
  [ -f "$archive" ] || "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d .work
  [ -f "$archive" ] || archive=".work/llama_cpp_python-$version.tar.gz"
  tar -xzf "$archive" -C .work
  src=".work/llama_cpp_python-$version"
  rm -rf "$src/.git" "$src/vendor/llama.cpp/docs" "$src/vendor/llama.cpp/media" "$src/vendor/llama.cpp/benches"
  find "$src/vendor/llama.cpp/models" -name '*.gguf*' -delete
  tar -czf "$out/llama_cpp_python-$version.tar.gz" -C .work "llama_cpp_python-$version"
  # its build backend, which pip cannot fetch there (check.sh builds with --no-build-isolation)
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .work/build scikit-build-core pathspec cmake ninja
  for wheel in .work/build/*.whl; do slim "$wheel"; done
fi
rm -rf .work

bytes=$(du -sb "$out" | cut -f1)
echo "bench/gpu/wheels: $((bytes / 1024 / 1024)) MiB of the 64 MiB a call may carry" >&2
tree=$(cd "$repo" && git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
echo "(the tree itself, which travels beside it: $((${tree:-0} / 1024 / 1024)) MiB)" >&2
ls -S "$out" | head -n 8 | sed 's/^/  /' >&2
if [ "$bytes" -gt "$limit" ]; then
  echo "prepare_wheels.sh: bench/gpu/wheels is over 64 MiB: leave something out (--sdist?)" >&2
  exit 1
fi
