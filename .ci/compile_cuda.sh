#!/usr/bin/env bash
# Compiles every CUDA source for sm_80 and sm_90, although this machine has no GPU:
#  - the torch-free kernel files (csrc/*/*.cu) with nvcc alone, to object files;
#  - the thin torch bindings (csrc/*/*_cuda.cpp) as a syntax check against the installed torch's
#    headers, with the one generated header that a CPU build of torch lacks supplied here.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do [ -x "$c" ] && NVCC=$c && break; done
fi
command -v "$NVCC" >/dev/null 2>&1 || { echo "compile_cuda: nvcc not found; install the CUDA toolkit" >&2; exit 1; }
CUDA_ROOT=${CUDA_HOME:-}
if [ -z "$CUDA_ROOT" ] || [ ! -f "$CUDA_ROOT/include/cuda_runtime_api.h" ]; then
  CUDA_ROOT=/usr/local/cuda
  [ -f "$CUDA_ROOT/include/cuda_runtime_api.h" ] || CUDA_ROOT=$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

n=0
for cu in csrc/*/*.cu; do
  "$NVCC" -std=c++20 -O3 --expt-relaxed-constexpr -Icsrc \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -c "$cu" -o "$out/$(basename "$cu").o"
  echo "nvcc sm_80+sm_90: $cu"
  n=$((n + 1))
done

TORCH_INC=$(python -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
PY_INC=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
mkdir -p "$out/stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
for cpp in csrc/*/*_cuda.cpp; do
  g++ -std=c++20 -fsyntax-only -Wno-deprecated-declarations -DUSE_CUDA -DUNIREF_WITH_CUDA \
    -I"$out/stub" -I"$TORCH_INC" -I"$TORCH_INC/torch/csrc/api/include" -I"$CUDA_ROOT/include" -I"$PY_INC" -Icsrc \
    "$cpp"
  echo "g++ syntax (CUDA binding): $cpp"
  n=$((n + 1))
done
echo "compile_cuda: $n CUDA sources compiled"
