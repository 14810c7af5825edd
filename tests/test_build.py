"""The build: the extension is there, has its CUDA part wherever nvcc is installed, and binds
each op once, as ``_C.<op>(device, stream, *args)``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from fastdecode import _native


def nvcc_present() -> bool:
    return bool(shutil.which("nvcc") or os.environ.get("CUDACXX")
                or Path("/usr/local/cuda/bin/nvcc").is_file())


def test_extension_is_built():
    assert _native.cpu_built()


@pytest.mark.skipif(os.environ.get("FASTDECODE_CUDA") == "0", reason="CUDA disabled by FASTDECODE_CUDA=0")
def test_cuda_compiled_where_nvcc_is():
    assert _native.cuda_built() == nvcc_present()
    if _native.cuda_built():
        assert set(_native.cuda_archs()) >= {"90"} or os.environ.get("FASTDECODE_CUDA_ARCHS")


def test_triton_kernels_subpackage_installed():
    import fastdecode.triton_kernels as tk

    assert Path(tk.__file__).parent.name == "triton_kernels"


NATIVE = pytest.mark.skipif(not _native.cpu_built(), reason="fastdecode._C is not built")

# Each native op and arguments of the right count (the device is refused before they are read).
OP_ARGS = {
    "verify_tree": (0,) * 10,
    "tree_mask": (0,) * 4,
    "tree_positions": (0,) * 5,
    "pack_tree_mask": (0,) * 4,
    "compact_kv": ([], [], [], 4, 0, 0, 0, 0, 0),
    "ngram_insert": (0,) * 10,
    "ngram_harvest": (0,) * 9,
    "ngram_insert_sequence": (0,) * 10,
    "ngram_lookup": (0,) * 9,
    "small_linear": (0,) * 10,
}


@NATIVE
def test_each_op_is_bound_once_under_its_plain_name():
    names = {n for n in dir(_native._C) if not n.startswith("_")}
    assert set(OP_ARGS) <= names
    assert sorted(n for n in names if n.endswith(("_cpu", "_cuda"))) == []
    for op in OP_ARGS:
        assert f"\n{op}(device, stream, " in getattr(_native._C, op).__doc__


@NATIVE
@pytest.mark.parametrize("op", sorted(OP_ARGS))
def test_an_unknown_device_selector_is_refused_naming_the_op(op):
    with pytest.raises(ValueError, match=f"{op}: device must be 'cpu' or 'cuda', found 'xpu'"):
        getattr(_native._C, op)("xpu", 0, *OP_ARGS[op])


@NATIVE
@pytest.mark.skipif(_native.cuda_built(), reason="the extension has its CUDA kernels")
@pytest.mark.parametrize("op", sorted(set(OP_ARGS) - {"small_linear"}))
def test_cuda_in_a_cpu_only_build_is_refused_naming_the_op(op):
    with pytest.raises(RuntimeError, match=f"{op} cannot run on CUDA: this build of "
                                           "fastdecode._C has no CUDA kernels"):
        getattr(_native._C, op)("cuda", 0, *OP_ARGS[op])


@NATIVE
def test_a_cpu_only_op_refuses_cuda():
    with pytest.raises(RuntimeError, match="small_linear has no CUDA kernel"):
        _native._C.small_linear("cuda", 0, *OP_ARGS["small_linear"])


def test_launch_passes_the_device_and_stream_first():
    calls = []
    _native.launch(lambda *a: calls.append(a), torch.zeros(1), 7, 8)
    assert calls == [("cpu", 0, 7, 8)]


@NATIVE
def test_launch_on_a_device_without_kernels_names_it():
    with pytest.raises(ValueError, match="tree_mask: device must be 'cpu' or 'cuda', found 'meta'"):
        _native.launch(_native._C.tree_mask, torch.empty(1, device="meta"), *OP_ARGS["tree_mask"])
