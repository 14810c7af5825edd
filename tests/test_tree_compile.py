"""The tree attention kernels compile for a GPU (sm_90) ahead of time, without one (see
tests/sm90.py: the interpreter accepts code a GPU build rejects). Each case lowers the kernel
with the tiles, warps and stages the launcher picks, with and without split-KV (and then the
merge kernel), plain and with the sliding window and soft-cap switched on: ``wide`` has 64 query rows per kv head (BLOCK_M=64, the most registers), ``narrow``
4 (BLOCK_M=16). bf16 at D=128 runs by default, the other dtypes and head dims are marked slow."""

from __future__ import annotations

import functools

import pytest
import torch
from sm90 import TRITON_TYPE, compile_sm90, main, run_case, why_not

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(why_not() is not None, reason=str(why_not()))

ROWS = {"wide": 64, "narrow": 4}  # T * G query rows per kv head


def attention_case(rows: int, dtype: torch.dtype, D: int) -> None:
    """Builds the attention kernel (both SPLIT settings) and the merge kernel for ``rows``
    query rows per kv head, ``dtype`` inputs and head dim ``D``."""
    from fastdecode.triton_kernels.tree import attention as kernels

    dt = TRITON_TYPE[dtype]
    block_m, block_n, block_d, warps, stages = kernels._config(D, rows, dtype)
    ints = {n: "i32" for n in ("B", "T", "Hq", "G", "D", "seg_start", "words", "num_splits",
                                "window")}
    strides = {f"stride_{t}{d}": "i32" for t in "qkv" for d in ("b", "h", "t" if t == "q" else "s")}
    for split, extras in ((False, False), (True, False), (False, True), (True, True)):
        part = "*fp32" if split else f"*{dt}"  # the launcher passes the output when unused
        sig = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "KV_START": "*i64", "KV_LEN": "*i64",
               "MASK": "*i32", "OUT": part, "M_PART": part, "L_PART": part, **ints,
               "qk_scale": "fp32", "softcap": "fp32", **strides}
        compile_sm90(kernels._tree_attention_kernel, sig,
                     {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "SPLIT": split,
                      "DOT_PRECISION": "tf32x3" if dtype == torch.float32 else "tf32",
                      "DOT_FP32": False, "WINDOW": extras, "SOFTCAP": extras}, warps, stages)
    compile_sm90(kernels._merge_splits_kernel,
                 {"ACC": "*fp32", "M_PART": "*fp32", "L_PART": "*fp32", "OUT": f"*{dt}",
                  "rows": "i32", "D": "i32", "num_splits": "i32"},
                 {"BLOCK_S": kernels.MAX_SPLITS, "BLOCK_D": block_d},
                 4 if block_d > 64 else 2)


CASES = {kind: functools.partial(attention_case, rows) for kind, rows in ROWS.items()}

SLOW = pytest.mark.slow
DTYPES = [pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16", marks=SLOW),
          pytest.param(torch.float32, id="fp32", marks=SLOW)]
HEAD_DIMS = [pytest.param(D, id=f"D{D}", marks=() if D == 128 else SLOW)
             for D in (64, 80, 96, 128, 256)]


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(CASES))
def test_tree_kernels_compile_for_sm90(kind, dtype, D):
    run_case(__file__, CASES, kind, dtype, D)


if __name__ == "__main__":  # one case, for run_case: KIND DTYPE D
    main(CASES)
