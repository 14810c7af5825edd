#!/usr/bin/env bash
# `make gpu-check`: build with CUDA, run the GPU tests, the whole suite and every benchmark on
# the GPU machine, and leave JSON, markdown and a log under $OUT (default bench/results/gpu-check).
# That machine has no network and its torch lives in the venv of its own python3, so this uses
# python3 directly and builds with the cmake, ninja and pybind11 already there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

step() {  # step NAME COMMAND...: runs one step, logs it, remembers a failure and goes on
  local name=$1 t0=$SECONDS
  shift
  echo "=== $name: $*"
  "$@"
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  echo "| $name | $rc | $((SECONDS - t0)) s |" >>"$OUT/steps.md"
  [ $rc -eq 0 ] || status=1
  return $rc
}

build() {
  FASTDECODE_CUDA=1 FASTDECODE_CUDA_ARCHS=${FASTDECODE_CUDA_ARCHS:-90} \
    "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
    || FASTDECODE_CUDA=1 FASTDECODE_CUDA_ARCHS=${FASTDECODE_CUDA_ARCHS:-90} \
      "$PY" setup.py -q build_ext --inplace
}

{
  echo "| step | rc | time |"
  echo "| --- | --- | --- |"
} >"$OUT/steps.md"
{
  status=0
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  step build build || { echo "build failed: nothing else can run"; exit 1; }
  step info "$PY" -m fastdecode info
  "$PY" -m fastdecode info --json >"$OUT/info.json"
  step gpu-tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests --junitxml="$OUT/pytest-gpu.xml"
  step all-tests "$PY" -m pytest -q -p no:cacheprovider -m "not gpu" tests --junitxml="$OUT/pytest-all.xml"
  for bench in bench/[!_]*.py; do
    step "$(basename "$bench" .py)" "$PY" "$bench" --device cuda --out "$OUT"
  done
  cat "$OUT/steps.md"
  exit $status
} 2>&1 | tee "$OUT/gpu-check.log"
exit "${PIPESTATUS[0]}"
