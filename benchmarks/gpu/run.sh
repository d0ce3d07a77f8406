#!/usr/bin/env bash
# The one device check: build the CUDA extension on a lent GPU, run the test suite there (CUDA
# parametrizations included), then every GPU benchmark script; everything is written to $OUT.
#   device run: bash benchmarks/gpu/run.sh
# Record what it prints under benchmarks/results/ with the card and date.
set -uo pipefail
OUT=${OUT:-/tmp/uniref-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 UNIREF_CUDA=1 UNIREF_CUDA_ARCHS=${UNIREF_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/card.txt"

start=$(date +%s)
python3 setup.py build_ext --inplace -q >"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
export PYTHONPATH=$PWD
python3 -c "import uniref; uniref.info()" | tee "$OUT/info.txt"

# Correctness first: the CUDA parametrizations of the test suite (tests that need packages the
# image lacks skip themselves).
timeout 240 python3 -m pytest tests -q -x -k "cuda" -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/tests.txt"

for script in benchmarks/gpu/packing.py benchmarks/gpu/attention.py benchmarks/gpu/grpo.py benchmarks/gpu/pipeline.py; do
  name=$(basename "$script" .py)
  timeout 240 python3 "$script" 2>&1 | tee "$OUT/$name.md"
done
