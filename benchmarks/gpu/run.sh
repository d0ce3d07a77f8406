#!/usr/bin/env bash
# The one device check: build the CUDA extension on a lent GPU, run the CUDA tests, the attention
# benchmark, compute-sanitizer on the attention kernels, then the other GPU benchmarks. Stages run in
# that order, each under its own time cap and a shared deadline (UNIREF_GPU_SECONDS from the start), so
# a short lease still returns the most important results; every stage's output goes to $OUT.
#   device run: bash benchmarks/gpu/run.sh [stage ...]     (default: all stages)
#   stages: build tests attention sanitize tests_api attention_small grpo packing pipeline
# Python packages the device image lacks (diffusers, for the pipeline benchmark and the tests that use
# it) travel as wheels in .whl/ (git-ignored), fetched beforehand with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     -d .whl diffusers importlib_metadata
# Record what it prints under benchmarks/results/ with the card and date.
set -uo pipefail
OUT=${OUT:-/tmp/uniref-gpu}
mkdir -p "$OUT"
export PATH=$PATH:/usr/local/cuda/bin
export PYTHONUNBUFFERED=1 UNIREF_CUDA=1 UNIREF_CUDA_ARCHS=${UNIREF_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
start=$(date +%s)
deadline=$((start + ${UNIREF_GPU_SECONDS:-480}))
stages=${*:-build tests attention sanitize tests_api attention_small grpo packing pipeline}
status=0

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# stage NAME CAP_SECONDS COMMAND...: runs COMMAND under min(CAP, time left), output to $OUT/NAME.txt.
stage() {
  local name=$1 cap=$2
  shift 2
  case " $stages " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((deadline - $(date +%s)))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, ${left} s left" | tee -a "$OUT/summary.txt"
    return 0
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  local t0=$(date +%s)
  echo "== $name (cap ${cap} s)"
  timeout "$cap" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  tail -c 2500 "$OUT/$name.txt"
  echo "== $name: rc $rc, $(($(date +%s) - t0)) s" | tee -a "$OUT/summary.txt"
  [ "$rc" -ne 0 ] && status=1
  return 0
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/summary.txt"

stage build 240 bash -c 'python3 setup.py build_ext --inplace -q && python3 -c "import uniref; uniref.info()"'

# Our kernels' tests first (CUDA parametrizations; tests needing packages the image lacks skip themselves).
stage tests 150 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -k "cuda and not emulator" \
  tests/test_attention.py tests/test_packing.py tests/test_grpo_triton.py

stage attention 240 python3 benchmarks/gpu/attention.py --batches B1024,B2048

# Only uniref's attention kernels are instrumented (kns: kernel-name substring); the rest runs natively.
sanitize() {
  local tool
  for tool in memcheck racecheck synccheck; do
    echo "-- compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --kernel-name kns=varlen_attn --error-exitcode 3 \
      python3 benchmarks/gpu/sanitize.py || return $?
  done
}
export -f sanitize
stage sanitize 150 bash -c sanitize

# Every backend through uniref.varlen_attention and the diffusers processor (FlexAttention compiles
# once per shape and dtype here).
stage tests_api 150 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -k "cuda" \
  tests/test_attention_api.py

stage attention_small 180 python3 benchmarks/gpu/attention.py --batches B512x16,B256x64
stage grpo 90 python3 benchmarks/gpu/grpo.py
stage packing 60 python3 benchmarks/gpu/packing.py
stage pipeline 180 python3 benchmarks/gpu/pipeline.py

echo "== total $(($(date +%s) - start)) s"
cat "$OUT/summary.txt"
exit $status
