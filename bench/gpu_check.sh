#!/usr/bin/env bash
# `make gpu-check`: build with CUDA, run the GPU tests and every benchmark on the GPU machine, and
# leave JSON, markdown and a log under $OUT (default bench/results/gpu-check).
#
# It must fit one device call (at most 10 minutes), so the whole run has a deadline
# (GPU_CHECK_SECONDS, default 540): steps run in order of importance, each under a timeout of
# the time left, and a step that would start with under 20 s left is skipped and reported.
# The machine has no network and its torch lives in its own python3, so this uses python3
# directly and builds with the cmake, ninja and pybind11 already there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))

# Benchmarks, most important first, with the options that fit them into the deadline.
# Any bench/*.py not listed here runs after them with no options.
BENCHES=(
  "tree_attention"
  "primitives"
  "decode_e2e --rounds 1"
  "castle --budget 60"
  "structured_ffn"
  "trie --quick"
  "train_tiny --minutes 1.5"
)

step() {  # step NAME COMMAND...: runs one step under the time left, logs it, goes on after a failure
  local name=$1 t0=$SECONDS left=$((DEADLINE - SECONDS))
  shift
  if [ "$left" -lt 20 ]; then
    echo "=== $name: skipped, ${left} s left of the deadline"
    echo "| $name | skipped (deadline) | - |" >>"$OUT/steps.md"
    status=1
    return 1
  fi
  echo "=== $name ($left s left): $*"
  timeout --signal=INT --kill-after=15 "$left" "$@"
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
  listed=" "
  for entry in "${BENCHES[@]}"; do
    read -r name opts <<<"$entry"
    listed+="$name "
    # shellcheck disable=SC2086  # opts is a list of words
    step "$name" "$PY" "bench/$name.py" --device cuda --out "$OUT" $opts
  done
  for bench in bench/[!_]*.py; do
    name=$(basename "$bench" .py)
    [[ $listed == *" $name "* ]] || step "$name" "$PY" "$bench" --device cuda --out "$OUT"
  done
  # The rest of the suite on this machine's torch and triton, with whatever time is left.
  step other-tests "$PY" -m pytest -q -p no:cacheprovider -m "not gpu and not slow" tests \
    --junitxml="$OUT/pytest-other.xml"
  cat "$OUT/steps.md"
  exit $status
} 2>&1 | tee "$OUT/gpu-check.log"
exit "${PIPESTATUS[0]}"
