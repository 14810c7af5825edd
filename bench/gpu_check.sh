#!/usr/bin/env bash
# `make gpu-check`: build with CUDA, run the GPU tests and every benchmark on the GPU machine, and
# leave their results under $OUT (default bench/results/gpu-check).
#
# It must fit one device call (at most 10 minutes), so the whole run has a deadline
# (GPU_CHECK_SECONDS, default 540): steps run in order of importance, each under a timeout of
# the time left, and a step that would start with under 20 s left is skipped and reported.
# The machine has no network and its torch lives in its own python3, so this uses python3
# directly and builds with the cmake, ninja and pybind11 already there.
#
# A device call brings back at most 8 files from $OUT, so every result is written into a work
# folder (GPU_CHECK_WORK, default a fresh temporary one) and $OUT receives four files:
#   gpu-check.log      the whole run's output, written as it runs
#   gpu-check.md       the steps table, then every benchmark's markdown report
#   gpu-check.tar.gz   the work folder: every JSON, markdown and PNG, pytest's XML, info.json
#   steps.md           the steps table alone
# Unpack the archive into bench/results/<gpu>/ to commit it.
#
# The default model (SmolLM2-135M-Instruct) cannot be installed there. FASTDECODE_MODEL_PARTS
# names a folder holding what `bench/gpu_model_parts.sh` prepares here (its GGUF in parts that
# fit one call's 64 MiB each, their checksum and the gguf wheel): the parts are joined,
# checked and converted once (under FASTDECODE_MODEL_DIR, default /tmp/fastdecode-model), and
# the default-model tests and benchmarks then run on it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-check}
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))

# Benchmarks, most important first, with the options that fit them into the deadline.
# Any bench/*.py not listed here runs after them with no options.
BENCHES=(
  "tree_attention"
  "primitives"
  "decode_e2e --rounds 1 --floor-rounds 1 --no-load"
  "castle --budget 60"
  "structured_ffn"
  "trie --quick"
  "train_tiny --minutes 1.5"
)

# Benchmarks of CPU kernels, which take no --device cuda.
CPU_ONLY=" cpu_linear "
# Benchmarks that run vLLM, skipped where this python cannot import it.
NEEDS_VLLM=" vllm_e2e vllm_step_costs "

step() {  # step NAME COMMAND...: runs one step under the time left, logs it, goes on after a failure
  local name=$1 t0=$SECONDS left=$((DEADLINE - SECONDS))
  shift
  if [ "$left" -lt 20 ]; then
    echo "=== $name: skipped, ${left} s left of the deadline"
    echo "| $name | skipped (deadline) | - |" >>"$WORK/steps.md"
    status=1
    return 1
  fi
  echo "=== $name ($left s left): $*"
  timeout --signal=INT --kill-after=15 "$left" "$@"
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  echo "| $name | $rc | $((SECONDS - t0)) s |" >>"$WORK/steps.md"
  [ $rc -eq 0 ] || status=1
  return $rc
}

model_from_parts() {  # joins and checks the GGUF parts; exports what load_default then reads
  local parts=$1 dest=${FASTDECODE_MODEL_DIR:-/tmp/fastdecode-model}
  mkdir -p "$dest"
  if ! ls "$parts"/*.gguf.part-* >/dev/null 2>&1 || [ ! -f "$parts/SHA256SUMS" ]; then
    echo "FASTDECODE_MODEL_PARTS=$parts: no GGUF parts or SHA256SUMS there"
    return 1
  fi
  local name
  name=$(awk '{print $2}' "$parts/SHA256SUMS")
  cat $(ls "$parts"/*.gguf.part-* | sort -V) >"$dest/$name"
  if ! (cd "$dest" && sha256sum -c --quiet "$parts/SHA256SUMS"); then
    echo "FASTDECODE_MODEL_PARTS=$parts: the joined GGUF fails its checksum (a part is missing?)"
    return 1
  fi
  if ! "$PY" -c "import gguf" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$dest/site" \
      "$parts"/gguf-*.whl || return 1
    export PYTHONPATH="$dest/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export FASTDECODE_GGUF="$dest/$name" FASTDECODE_CACHE="$dest/cache"
  echo "default model: $FASTDECODE_GGUF, converted into $FASTDECODE_CACHE"
}

pack() {  # the four files that come back from $OUT
  cp "$WORK/steps.md" "$OUT/steps.md"
  {
    cat "$WORK/steps.md"
    for md in "$WORK"/*.md; do
      [ "$(basename "$md")" = steps.md ] && continue
      printf '\n---\n\n'
      cat "$md"
    done
  } >"$OUT/gpu-check.md"
  tar -czf "$OUT/gpu-check.tar.gz" -C "$WORK" .
  echo "packed $OUT/gpu-check.md and $OUT/gpu-check.tar.gz ($(du -h "$OUT/gpu-check.tar.gz" | cut -f1))"
}

{
  echo "| step | rc | time |"
  echo "| --- | --- | --- |"
} >"$WORK/steps.md"
{
  status=0
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  echo "results: $WORK"
  # (step runs commands, not shell functions, under timeout)
  cuda=(env FASTDECODE_CUDA=1 "FASTDECODE_CUDA_ARCHS=${FASTDECODE_CUDA_ARCHS:-90}")
  step build "${cuda[@]}" "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
    || step build-inplace "${cuda[@]}" "$PY" setup.py -q build_ext --inplace \
    || { echo "build failed: nothing else can run"; pack; exit 1; }
  step info "$PY" -m fastdecode info
  "$PY" -m fastdecode info --json >"$WORK/info.json"
  if [ -n "${FASTDECODE_MODEL_PARTS:-}" ]; then
    if model_from_parts "$FASTDECODE_MODEL_PARTS"; then
      step model "$PY" -c "from fastdecode.models import load_default; load_default()"
    else
      echo "| model | parts unusable | - |" >>"$WORK/steps.md"
      status=1
    fi
  fi
  step gpu-tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests --junitxml="$WORK/pytest-gpu.xml"
  listed=" "
  for entry in "${BENCHES[@]}"; do
    read -r name opts <<<"$entry"
    listed+="$name "
    # shellcheck disable=SC2086  # opts is a list of words
    step "$name" "$PY" "bench/$name.py" --device cuda --out "$WORK" $opts
  done
  for bench in bench/[!_]*.py; do
    name=$(basename "$bench" .py)
    [[ $listed == *" $name "* ]] && continue
    if [[ $CPU_ONLY == *" $name "* ]]; then
      echo "| $name | skipped (a CPU benchmark) | - |" >>"$WORK/steps.md"
      continue
    fi
    if [[ $NEEDS_VLLM == *" $name "* ]] && ! "$PY" -c "import vllm" 2>/dev/null; then
      echo "=== $name: skipped, vLLM is not installed for $PY"
      echo "| $name | skipped (vLLM not installed) | - |" >>"$WORK/steps.md"
      continue
    fi
    step "$name" "$PY" "$bench" --device cuda --out "$WORK"
  done
  # The rest of the suite on this machine's torch and triton, with whatever time is left.
  step other-tests "$PY" -m pytest -q -p no:cacheprovider -m "not gpu and not slow" tests \
    --junitxml="$WORK/pytest-other.xml"
  cat "$WORK/steps.md"
  pack
  exit $status
} 2>&1 | tee "$OUT/gpu-check.log"
exit "${PIPESTATUS[0]}"
