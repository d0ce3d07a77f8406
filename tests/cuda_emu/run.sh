#!/usr/bin/env bash
# Builds the CPU emulation of the CUDA varlen attention kernels and runs it (no GPU needed).
#   bash tests/cuda_emu/run.sh [quick|all]        or any arguments of emu_attention_test
set -euo pipefail
cd "$(dirname "$0")/../.."
CUDA_ROOT=${CUDA_HOME:-/usr/local/cuda}
out=${EMU_BUILD_DIR:-$(mktemp -d)}
g++ -std=c++20 -O2 -Wall -Wno-unknown-pragmas -Icsrc -Itests/cuda_emu -I"$CUDA_ROOT/include" \
  tests/cuda_emu/emu_attention_test.cpp -o "$out/emu_attention_test"
"$out/emu_attention_test" "${@:-quick}"
