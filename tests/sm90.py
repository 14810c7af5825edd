"""Ahead-of-time sm_90 builds of Triton kernels, without a GPU, for the ``*_compile`` tests:
Triton's interpreter, which runs the kernels on the CPU, accepts code a GPU build rejects (a
plain float global read inside a kernel, for one). Under TRITON_INTERPRET=1 the kernels are
interpreter objects, so each case runs in a child Python without it."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
               torch.float64: "fp64"}
BY_NAME = {v: k for k, v in TRITON_TYPE.items()}


def why_not() -> str | None:
    """Why sm_90 builds cannot run here, or None."""
    if torch.cuda.is_available():
        return "a GPU is here: the gpu tests build the kernels for real"
    spec = importlib.util.find_spec("triton.backends.nvidia")
    if spec is None:
        return "triton has no NVIDIA backend"
    ptxas = Path(spec.origin).parent / "bin" / "ptxas"
    if not ptxas.is_file() and shutil.which("ptxas") is None:
        return "no ptxas"
    return None


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int = 1):
    """Lowers the ``@triton.jit`` function ``fn`` to an sm_90 cubin. ``signature``: argument
    name to Triton type (``"*bf16"``, ``"i32"``, ...); ``constexprs``: the compile-time ones."""
    import triton
    from triton.backends.compiler import GPUTarget

    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def run_case(test_file: str, cases: dict, kind: str, dtype: torch.dtype, D: int) -> None:
    """Runs ``cases[kind](dtype, D)`` here, or, with the interpreter on, in a child Python
    without it: ``python test_file KIND DTYPE D`` (the test file's ``__main__`` calls
    :func:`main`)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        cases[kind](dtype, D)
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, test_file, kind, TRITON_TYPE[dtype], str(D)],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def main(cases: dict) -> None:
    """A child's entry point: runs the case ``KIND DTYPE D`` named on the command line."""
    cases[sys.argv[1]](BY_NAME[sys.argv[2]], int(sys.argv[3]))
