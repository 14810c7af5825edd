"""The CASTLE Triton kernels compile for a GPU (sm_90) ahead of time, without one: the
interpreter that runs them on the CPU accepts code a GPU build rejects (a plain float global read
inside a kernel, for one). Each case lowers one kernel through Triton's NVIDIA backend to a
cubin with the block sizes and warps the launchers use (tests/sm90.py). The bf16 set runs by
default, the other dtypes and head dims are marked slow (a compile takes several seconds on one
core)."""

from __future__ import annotations

import pytest
import torch
from sm90 import TRITON_TYPE, compile_sm90, main, run_case, why_not

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(why_not() is not None, reason=str(why_not()))


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
    run_case(__file__, CASES, kind, dtype, D)


if __name__ == "__main__":  # one case, for run_case: KIND DTYPE D
    main(CASES)
