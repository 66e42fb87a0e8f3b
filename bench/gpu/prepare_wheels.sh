#!/usr/bin/env bash
# Gather, on a connected machine, the wheels the lent GPU machine lacks for qlora_compare.py
# (it has torch, transformers and peft): bitsandbytes, unsloth and unsloth_zoo, slimmed so all of
# bench/gpu/wheels fits the 64 MiB a call may carry (Unsloth's studio/ web app and the CUDA
# libraries of other CUDA versions inside bitsandbytes are dropped).
#   bash bench/gpu/prepare_wheels.sh [CUDA_MAJOR_MINOR, default 128]
# then on the GPU machine, in one call:
#   pip install --no-deps bench/gpu/wheels/*.whl && python bench/gpu/qlora_compare.py
set -euo pipefail
cd "$(dirname "$0")"
cuda="${1:-128}"
out=wheels
rm -rf "$out" .work && mkdir -p "$out" .work
python3 -m pip download --quiet --no-deps -d .work bitsandbytes==0.50.2 unsloth==2026.10.9 unsloth_zoo==2026.10.9 \
  tyro msgspec cut_cross_entropy
for wheel in .work/*.whl; do
  name=$(basename "$wheel")
  dir=".work/${name%.whl}"
  python3 -m wheel unpack -d "$dir" "$wheel" >/dev/null
  root=$(ls -d "$dir"/*/ | head -n 1)
  rm -rf "$root"/unsloth/studio 2>/dev/null || true
  find "$root" -name 'libbitsandbytes_cuda*.so' ! -name "libbitsandbytes_cuda${cuda}.so" -delete
  python3 -m wheel pack -d "$out" "$root" >/dev/null
done
rm -rf .work
du -sh "$out"
