"""Backend dispatch: defaults per device, FASTDECODE_BACKEND, use_backend(), clear errors,
info() and the `fastdecode info` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import torch

import fastdecode
from fastdecode import _backend, _native
from fastdecode._info import format_info
from fastdecode.ops import block_shuffle, tree_mask

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


def test_a_backend_registered_with_dtypes_is_passed_over_or_refused(monkeypatch):
    """A backend that takes only some dtypes: the automatic choice takes the next one for the
    others, and forcing it for them raises naming the op, the backend and the dtype."""
    monkeypatch.delenv("FASTDECODE_BACKEND", raising=False)
    monkeypatch.setitem(_backend._REGISTRY, "dtype_probe", {})
    # Both entries go again at teardown (monkeypatch restores their absence).
    monkeypatch.setitem(_backend._DTYPES, ("dtype_probe", "cpu"), frozenset())
    _backend.register("dtype_probe", "torch")(lambda x: "torch")
    _backend.register("dtype_probe", "cpu", dtypes=[torch.float32])(lambda x: "cpu")
    x32, x64 = torch.zeros(2), torch.zeros(2, dtype=torch.float64)
    assert _backend.run("dtype_probe", CPU, x32) == "cpu"
    assert _backend.run("dtype_probe", CPU, x64) == "torch"
    assert _backend.run("dtype_probe", CPU, torch.zeros(2, dtype=torch.int64)) == "cpu"
    with fastdecode.use_backend("cpu"):
        assert _backend.run("dtype_probe", CPU, x32) == "cpu"
        with pytest.raises(fastdecode.BackendUnavailableError,
                           match=r"backend 'cpu' of dtype_probe cannot run \(requested by "
                                 r"use_backend\(\)\): it does not take float64 tensors \(it "
                                 r"takes float32\)"):
            _backend.run("dtype_probe", CPU, x64)
    monkeypatch.setenv("FASTDECODE_BACKEND", "cpu")
    with pytest.raises(fastdecode.BackendUnavailableError,
                       match="requested by FASTDECODE_BACKEND.*float64"):
        _backend.run("dtype_probe", CPU, x64)
    assert _backend.available("dtype_probe") == {"cpu": True, "torch": True}


def _triton_ops() -> list[str]:
    return [op for op in _backend.ops() if "triton" in _backend._REGISTRY[op]]


def test_info_without_triton(monkeypatch):
    """triton not importable (sys.modules["triton"] = None makes find_spec and import fail):
    info() has no triton version, every triton backend reads False there and in available(),
    and the table shows '-' and 'no' and says how to get them."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # with triton, its backends would run on the CPU
    monkeypatch.setitem(sys.modules, "triton", None)
    assert not _backend._triton_installed()
    facts = fastdecode.info()
    assert facts["triton"] is None
    assert _triton_ops(), "no op has a triton backend"
    for op in _triton_ops():
        assert facts["ops"][op]["triton"] is False
        assert _backend.available(op)["triton"] is False
        assert _backend.available(op)["torch"] is True
    lines = format_info(facts).splitlines()
    assert ["triton", "-"] in [line.split() for line in lines]
    header = next(line for line in lines if line.startswith("op "))
    column = header.index("triton")
    for op in _triton_ops():
        row = next(line for line in lines if line.split()[:1] == [op])
        assert row[column:column + 6].strip() == "no", row
    assert "pip install triton" in lines[-1]


def test_cli_info_without_triton():
    """``python -m fastdecode info`` in a process where triton cannot be imported."""
    code = ("import sys\nsys.modules['triton'] = None\nfrom fastdecode.cli import main\n"
            "raise SystemExit(main(['info', '--json']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    facts = json.loads(out)
    assert facts["triton"] is None
    triton_ops = [op for op, backends in facts["ops"].items() if "triton" in backends]
    assert triton_ops and all(facts["ops"][op]["triton"] is False for op in triton_ops)


def test_forced_triton_without_triton_names_the_reason(monkeypatch):
    """Forcing triton where triton is missing raises, naming the op and the reason."""
    monkeypatch.setitem(sys.modules, "triton", None)
    with fastdecode.use_backend("triton"):
        with pytest.raises(fastdecode.BackendUnavailableError,
                           match="backend 'triton' of block_shuffle cannot run .*: triton is "
                                 "not installed"):
            block_shuffle(torch.randn(3, 12), torch.randn(2, 4, 6), torch.randn(2, 4, 4))
