"""The CASTLE Triton kernels compile for a GPU (sm_90) ahead of time, without one: the
interpreter that runs them on the CPU accepts code a GPU build rejects (a plain float global read
inside a kernel, for one). Each case lowers one kernel through Triton's NVIDIA backend to a
cubin with the block sizes and warps the launchers use. The bf16 set runs by default, the other
dtypes and head dims are marked slow (a compile takes several seconds on one core). Under
TRITON_INTERPRET=1 the kernels are interpreter objects, so each case runs in a child Python
without it (this file's ``__main__``)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")


def _nvidia_backend() -> str | None:
    """Why these checks do not run here, or None."""
    if torch.cuda.is_available():
        return "a GPU is here: the gpu tests build the kernels for real"
    spec = importlib.util.find_spec("triton.backends.nvidia")
    if spec is None:
        return "triton has no NVIDIA backend"
    ptxas = Path(spec.origin).parent / "bin" / "ptxas"
    if not ptxas.is_file() and shutil.which("ptxas") is None:
        return "no ptxas"
    return None


pytestmark = pytest.mark.skipif(_nvidia_backend() is not None, reason=str(_nvidia_backend()))

TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
               torch.float64: "fp64"}


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int):
    from triton.backends.compiler import GPUTarget

    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": 1})


def parallel_case(kind: str, dtype: torch.dtype, D: int) -> None:
    from fastdecode.triton_kernels.castle import parallel

    dt, sd = TRITON_TYPE[dtype], "fp64" if dtype == torch.float64 else "fp32"
    inputs = {n: f"*{dt}" for n in ("QC", "KC", "VC", "QU", "KU", "VU")}
    scalars = {"L": "i32", "D": "i32"}
    if kind == "forward":
        fn, block = parallel._castle_forward_kernel, parallel.forward_block(
            D, dtype, torch.device("cuda"))
        sig = {**inputs, "OUT": f"*{dt}", **{n: f"*{sd}" for n in ("LSE", "DST", "ACC", "MST",
                                                                    "LST")},
               **scalars, "k": "i32", "window": "i32", "scale": "fp32"}
    else:
        fn, block = parallel._castle_backward_kernel, parallel.BACKWARD_BLOCK
        sig = {**inputs, "DO": f"*{dt}",
               **{n: f"*{sd}" for n in ("LSE", "DELTA", "UL", "DQC", "DKC", "DVC", "DQU", "DKU",
                                        "DVU")},
               **scalars, "N": "i32", "window": "i32", "scale": "fp32"}
    up = dtype == torch.float64
    compile_sm90(fn, sig, {"BLOCK": block, "BLOCK_D": triton.next_power_of_2(D), "DOT_UP": up,
                           "PREC": "ieee" if up else "tf32x3"}, parallel.NUM_WARPS)


def decode_case(dtype: torch.dtype, D: int, split: bool) -> None:
    from fastdecode.triton_kernels.castle import decode

    dt, sd = TRITON_TYPE[dtype], "fp64" if dtype == torch.float64 else "fp32"
    block_d = triton.next_power_of_2(D)
    sig = {"U": f"*{sd}", **{n: f"*{dt}" for n in ("QU", "KC", "VC", "QC", "KU", "VU")},
           "OUT": f"*{sd}" if split else f"*{dt}", "M_PART": f"*{sd}", "L_PART": f"*{sd}",
           **{n: "i32" for n in ("BH", "D", "t0", "qu_base", "window")}, "scale": "fp32",
           "num_splits": "i32",
           **{n: "i64" for n in ("stride_b", "stride_h", "stride_s", "qu_stride_b",
                                 "qu_stride_h", "qu_stride_s")}, "H": "i32"}
    block_n, warps = decode.tiles(D)
    compile_sm90(decode._castle_decode_kernel, sig,
                 {"BLOCK_N": block_n, "BLOCK_D": block_d, "SPLIT": split}, warps)
    if split:
        compile_sm90(decode._merge_kernel,
                     {"ACC": f"*{sd}", "M_PART": f"*{sd}", "L_PART": f"*{sd}", "OUT": f"*{dt}",
                      "BH": "i32", "D": "i32", "num_splits": "i32"},
                     {"BLOCK_S": 32, "BLOCK_D": block_d}, 4)


SLOW = pytest.mark.slow
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16",
                                                                marks=SLOW),
          pytest.param(torch.float32, id="fp32", marks=SLOW),
          pytest.param(torch.float64, id="fp64", marks=SLOW)]
HEAD_DIMS = [pytest.param(64, id="D64"), pytest.param(128, id="D128", marks=SLOW),
             pytest.param(256, id="D256", marks=SLOW)]


def run_case(kind: str, dtype: torch.dtype, D: int) -> None:
    """Compiles one case here, or in a child Python when the interpreter is on."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        CASES[kind](dtype, D)
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, kind, TRITON_TYPE[dtype], str(D)], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def decode_both(dtype: torch.dtype, D: int) -> None:
    decode_case(dtype, D, split=True)
    decode_case(dtype, D, split=False)


CASES = {"forward": lambda dtype, D: parallel_case("forward", dtype, D),
         "backward": lambda dtype, D: parallel_case("backward", dtype, D),
         "decode": decode_both}


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(CASES))
def test_kernels_compile_for_sm90(kind, dtype, D):
    run_case(kind, dtype, D)


if __name__ == "__main__":  # one case, for run_case: KIND DTYPE D
    by_name = {v: k for k, v in TRITON_TYPE.items()}
    CASES[sys.argv[1]](by_name[sys.argv[2]], int(sys.argv[3]))
