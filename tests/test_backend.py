"""Backend dispatch: defaults per device, FASTDECODE_BACKEND, use_backend(), clear errors,
info() and the `fastdecode info` CLI."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

import fastdecode
from fastdecode import _backend, _native
from fastdecode.ops import tree_mask

CPU = torch.device("cpu")
PARENTS = torch.tensor([[-1, 0, 1]])


def test_default_is_fastest_available_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTDECODE_BACKEND", raising=False)
    assert _backend.select("verify_tree", CPU)[0] == "cpu"
    monkeypatch.setattr(_native, "_C", None)  # an unbuilt source tree falls back to torch
    assert _backend.select("verify_tree", CPU)[0] == "torch"


def test_default_on_cuda_prefers_cuda_kernels(monkeypatch):
    monkeypatch.delenv("FASTDECODE_BACKEND", raising=False)
    want = "cuda" if _native.cuda_built() else "torch"
    assert _backend.select("compact_kv", torch.device("cuda"))[0] == want


def test_env_var_override(monkeypatch):
    monkeypatch.setenv("FASTDECODE_BACKEND", "torch")
    assert _backend.select("tree_mask", CPU)[0] == "torch"
    monkeypatch.setenv("FASTDECODE_BACKEND", "cuda")
    with pytest.raises(fastdecode.BackendUnavailableError,
                       match=r"backend 'cuda' of tree_mask cannot run \(requested by FASTDECODE_BACKEND\): "
                             "it runs on CUDA tensors, not cpu"):
        tree_mask(PARENTS)
    monkeypatch.setenv("FASTDECODE_BACKEND", "fortran")
    with pytest.raises(ValueError, match="FASTDECODE_BACKEND must be one of cuda, triton, cpu, torch; found 'fortran'"):
        tree_mask(PARENTS)


def test_use_backend_beats_env_and_nests(monkeypatch):
    monkeypatch.setenv("FASTDECODE_BACKEND", "cpu")
    with fastdecode.use_backend("torch"):
        assert _backend.select("tree_mask", CPU)[0] == "torch"
        with fastdecode.use_backend("cpu", ops=["verify_tree"]):
            assert _backend.select("verify_tree", CPU)[0] == "cpu"
            assert _backend.select("tree_mask", CPU)[0] == "torch"
        assert _backend.select("verify_tree", CPU)[0] == "torch"
    assert _backend.select("tree_mask", CPU)[0] == "cpu"


def test_use_backend_is_thread_local():
    seen = []
    with fastdecode.use_backend("torch"):
        t = threading.Thread(target=lambda: seen.append(_backend.select("tree_mask", CPU)[0]))
        t.start()
        t.join()
    assert seen == ["cpu"]


def test_unavailable_backends_raise_clearly():
    with fastdecode.use_backend("triton"):
        with pytest.raises(fastdecode.BackendUnavailableError,
                           match=r"tree_mask has no 'triton' backend \(requested by use_backend\(\)\); "
                                 "it has: cuda, cpu, torch"):
            tree_mask(PARENTS)
    with pytest.raises(ValueError, match=r"use_backend\(name\) must be one of"):
        with fastdecode.use_backend("gpu"):
            pass
    with pytest.raises(ValueError, match=r"use_backend\(ops\) names unknown ops \['nope'\]"):
        with fastdecode.use_backend("cpu", ops=["nope"]):
            pass


def test_info_reports_build_and_backends():
    facts = fastdecode.info()
    assert facts["version"] == fastdecode.__version__
    assert facts["torch"] == torch.__version__
    assert facts["native_built"] is True
    assert facts["cuda_built"] == bool(_native._C.cuda_built)
    assert facts["gpu"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    for op in ("verify_tree", "tree_mask", "tree_positions", "pack_tree_mask", "compact_kv"):
        assert facts["ops"][op] == {"cuda": torch.cuda.is_available() and facts["cuda_built"],
                                    "cpu": True, "torch": True}


def test_cli_info_prints_a_table():
    out = subprocess.run([sys.executable, "-m", "fastdecode", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert "verify_tree" in out and "cuda_built" in out
    header = next(line for line in out.splitlines() if line.startswith("op "))
    assert header.split() == ["op", "cuda", "triton", "cpu", "torch"]


def test_cli_demo_primitives_runs():
    out = subprocess.run([sys.executable, "-m", "fastdecode", "demo", "--primitives"],
                         capture_output=True, text=True, check=True).stdout
    assert "append 'ran away in'" in out
    assert "rows 12..14 now hold [12, 17, 18]" in out


def test_cli_demo_decodes_every_category_identically():
    """The model demo on a tiny budget: a row per category and overall, all outputs identical
    to greedy, auto's choices, and a progress bar that reaches the end."""
    done = subprocess.run([sys.executable, "-m", "fastdecode", "demo", "--device", "cpu",
                           "--threads", "1", "--max-new-tokens", "3"],
                          capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("category"))
    table = lines[top: lines.index("", top)]
    rows = {line.split()[0]: line.split() for line in table}
    for category in ("code", "chat", "retrieval", "rewrite", "all"):
        assert rows[category][-1] == "yes", done.stdout
    assert "what auto chose" in done.stdout
    assert "100%" in done.stderr.splitlines()[-1]
