#!/usr/bin/env bash
# The GPU check (bench/gpu/check.py says what each step proves): install what the lent GPU machine lacks, then
# run every GPU path of the appliance through its own CLI and print one table.
#
#   bash bench/gpu/check.sh [--cpu] [--steps N] [--work DIR] [--out FILE] [--build-cuda]
#
# On the lent machine (one NVIDIA GPU; python3 with torch+CUDA, transformers and peft), in ONE call of under
# 10 minutes (the installs and the check together keep to 570 s):
#   here:   bash bench/gpu/prepare_wheels.sh                 # bench/gpu/wheels/, at most 64 MiB
#   there:  bash bench/gpu/check.sh                          # carry bench/gpu/wheels with the tree
# It installs with `pip install --no-deps --no-index` each carried wheel whose distribution that python lacks
# (never replacing its torch, transformers or peft), the appliance itself with `pip install --no-deps -e .`
# (or PYTHONPATH when its setuptools cannot), points APPLIANCE_TOOLCHAIN at the carried converter, and runs
# bench/gpu/check.py with the carried tokenizer and prepared data. What comes back in $OUT: check.out.txt (the
# table; `python bench/run_all.py --from-file gpu_check=PATH` records it in BENCHMARKS.md) and check.out.log
# (the end of each failed step's output).
#
# --build-cuda (a call of its own, after `prepare_wheels.sh --sdist` here) only builds llama-cpp-python with CUDA
# from the carried source archive into $OUT; put that wheel in bench/gpu/llama-cuda/ here and run prepare_wheels.sh
# again, and the next check carries it (its GPU decode row then runs).
#
# --cpu is the dry run here, with .venv/bin/python, installing nothing (tests/test_gpu_check.py runs it).
set -euo pipefail
cd "$(dirname "$0")/../.."
kit=bench/gpu/wheels

cpu=0
out_given=0
for arg in "$@"; do
  case "$arg" in
    --cpu) cpu=1 ;;
    --out|--out=*) out_given=1 ;;
  esac
done

if [ "$cpu" = 1 ]; then
  [ -x .venv/bin/python ] || { echo "check.sh --cpu: no .venv/bin/python here; run ./install.sh first" >&2; exit 2; }
  exec .venv/bin/python bench/gpu/check.py "$@"
fi

PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || { echo "check.sh: no $PY on this machine (set PYTHON)" >&2; exit 2; }
started=$(date +%s)
export PIP_BREAK_SYSTEM_PACKAGES=1  # the lent machine is thrown away after the call; its python may be the system's

missing=()
for wheel in "$kit"/*.whl; do
  [ -e "$wheel" ] || continue
  dist="$(basename "$wheel" | cut -d- -f1)"
  if "$PY" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$dist" 2>/dev/null; then
    echo "check.sh: $dist is installed already, its carried wheel is not used" >&2
  else
    missing+=("$wheel")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "check.sh: installing ${#missing[@]} carried wheels" >&2
  if ! "$PY" -m pip install --quiet --no-deps --no-index "${missing[@]}"; then
    for wheel in "${missing[@]}"; do  # one by one: a wheel this python cannot take fails only the steps needing it
      "$PY" -m pip install --quiet --no-deps --no-index "$wheel" || echo "check.sh: could not install $wheel" >&2
    done
  fi
fi
if ! "$PY" -m pip install --quiet --no-deps --no-index --no-build-isolation -e . >/tmp/appliance-pip-e.log 2>&1; then
  echo "check.sh: pip install -e . failed ($(grep -v '^ *$' /tmp/appliance-pip-e.log | tail -n 1)); using PYTHONPATH" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

prefix="$("$PY" -c 'import sys; print(sys.prefix)')"
if [ ! -f "$prefix/share/appliance/llama.cpp/toolchain.json" ] && [ -f "$kit/kit/llama.cpp/toolchain.json" ]; then
  export APPLIANCE_TOOLCHAIN="$PWD/$kit/kit/llama.cpp"
fi
extra=()
[ -d "$kit/kit/tokenizer" ] && extra+=(--tokenizer "$kit/kit/tokenizer")
[ -d "$kit/kit/data" ] && extra+=(--data "$kit/kit/data")
if [ "$out_given" = 0 ] && [ -n "${OUT:-}" ]; then
  extra+=(--out "$OUT/check.out.txt")
fi
spent=$(( $(date +%s) - started ))
echo "check.sh: installed in ${spent} s" >&2
extra+=(--budget "$(( 570 - spent ))")  # the whole call under 10 minutes; a --budget given here wins
exec "$PY" bench/gpu/check.py "${extra[@]}" "$@"
