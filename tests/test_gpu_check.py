"""The plumbing of `make gpu-check` (bench/gpu_check.sh), run here with a stand-in python3 that
records its calls and succeeds: every step runs as a command under the deadline, $OUT receives
only the four files a device call brings back, and the default model's GGUF parts are joined,
checked and handed to load_default (FASTDECODE_GGUF, FASTDECODE_CACHE), or refused when one is
damaged. What the steps do on a GPU is tested by the steps themselves."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GGUF = "model.Q4_1.gguf"
STUB = """#!/usr/bin/env bash
echo "$* | GGUF=${FASTDECODE_GGUF:-} CACHE=${FASTDECODE_CACHE:-}" >>"$CALLS"
[ "$*" = "-m fastdecode info --json" ] && echo '{}'
[ "$*" = "-c import vllm" ] && [ -n "${NO_VLLM:-}" ] && exit 1
exit 0
"""


def _parts(folder: Path, payload: bytes) -> None:
    """Two parts of ``payload`` and its checksum, as bench/gpu_model_parts.sh lays them out."""
    folder.mkdir()
    half = len(payload) // 2
    (folder / f"{GGUF}.part-1").write_bytes(payload[:half])
    (folder / f"{GGUF}.part-2").write_bytes(payload[half:])
    (folder / "SHA256SUMS").write_text(f"{hashlib.sha256(payload).hexdigest()}  {GGUF}\n")
    (folder / "gguf-0.0.0-py3-none-any.whl").write_bytes(b"")


def _run(tmp_path: Path, parts: Path | None, **extra: str) -> tuple[int, Path, str]:
    stub = tmp_path / "python3"
    stub.write_text(STUB)
    stub.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {k: v for k, v in os.environ.items()
           if k not in ("FASTDECODE_GGUF", "FASTDECODE_CACHE", "FASTDECODE_MODEL_PARTS")}
    env.update(PYTHON=str(stub), CALLS=str(calls), OUT=str(tmp_path / "out"),
               GPU_CHECK_WORK=str(tmp_path / "work"), GPU_CHECK_SECONDS="120",
               FASTDECODE_MODEL_DIR=str(tmp_path / "model"), **extra)
    if parts is not None:
        env["FASTDECODE_MODEL_PARTS"] = str(parts)
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    return done.returncode, tmp_path / "out", calls.read_text()


def _rows(out: Path) -> dict[str, str]:
    lines = (out / "steps.md").read_text().splitlines()[2:]
    return {cells[1].strip(): cells[2].strip() for cells in (line.split("|") for line in lines)}


def test_every_step_runs_and_four_files_come_back(tmp_path):
    payload = os.urandom(1001)
    _parts(tmp_path / "parts", payload)
    rc, out, calls = _run(tmp_path, tmp_path / "parts")
    assert rc == 0, (out / "gpu-check.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu-check.log", "gpu-check.md", "gpu-check.tar.gz", "steps.md"]
    rows = _rows(out)
    benches = sorted(p.stem for p in (ROOT / "bench").glob("[!_]*.py"))
    for name in ["build", "info", "model", "gpu-tests", "other-tests",
                 *(b for b in benches if b != "cpu_linear")]:
        assert rows.get(name) == "0", (name, rows)
    assert rows["cpu_linear"].startswith("skipped")
    assert "-m pip install -q --no-build-isolation --no-deps -e ." in calls
    joined = tmp_path / "model" / GGUF
    assert joined.read_bytes() == payload
    convert = next(line for line in calls.splitlines() if "load_default()" in line)
    assert f"GGUF={joined} CACHE={tmp_path / 'model' / 'cache'}" in convert
    bench_call = next(line for line in calls.splitlines() if "bench/decode_e2e.py" in line)
    assert f"GGUF={joined}" in bench_call and f"--out {tmp_path / 'work'}" in bench_call
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        assert {"./steps.md", "./info.json"} <= set(tar.getnames())
    assert (out / "gpu-check.md").read_text().startswith("| step | rc | time |")


def test_vllm_benchmarks_are_skipped_where_vllm_is_not_installed(tmp_path):
    rc, out, calls = _run(tmp_path, None, NO_VLLM="1")
    assert rc == 0, (out / "gpu-check.log").read_text()
    rows = _rows(out)
    for name in ("vllm_e2e", "vllm_step_costs"):
        assert rows[name] == "skipped (vLLM not installed)"
        assert f"bench/{name}.py" not in calls
    assert rows["trie"] == "0" and rows["other-tests"] == "0"


@pytest.mark.parametrize("damage", ["drop", "flip"])
def test_damaged_parts_run_the_rest_without_the_model(tmp_path, damage):
    _parts(tmp_path / "parts", os.urandom(1001))
    part = tmp_path / "parts" / f"{GGUF}.part-2"
    if damage == "drop":
        part.unlink()
    else:
        part.write_bytes(b"x" + part.read_bytes()[1:])
    rc, out, calls = _run(tmp_path, tmp_path / "parts")
    assert rc == 1
    rows = _rows(out)
    assert rows["model"] == "parts unusable" and rows["other-tests"] == "0"
    assert "load_default()" not in calls and "GGUF= " in calls
    assert "fails its checksum" in (out / "gpu-check.log").read_text()
