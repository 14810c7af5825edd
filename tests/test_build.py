"""The build: the extension is there, and has its CUDA part wherever nvcc is installed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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
