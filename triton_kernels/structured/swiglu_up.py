"""Low-rank / block-dense FFN up-projection fused with SwiGLU. The op and its plain-torch
reference live in :mod:`fastdecode.ops.structured`.

Two launches: stage 1 ``t = BD(v) x`` is :func:`.block_shuffle.block_matmul` with the block
index maps (x's dtype, kept for the backward); stage 2 is one GEMM in which a program owns a
tile of f columns and computes both the gate rows ``u[n]`` and the up rows ``u[f + n]`` over t,
then stores ``silu(gate) * up``: the ``[T, 2f]`` gate/up activations never reach memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_shuffle import (
    _dot_flags,
    _on,
    _operand,
    _tiles,
    block_matmul,
    bucket,
    tuned,
    use_tuned,
)


@triton.jit
def _swiglu_up_kernel(Tm, U, OUT, T, F, R, T_BUCKET,
                      BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Grid ``(cdiv(T, BLOCK_T), cdiv(F, BLOCK_N))``: ``OUT[t, n] = silu(g) * up`` with
    ``g = sum_k Tm[t, k] U[n, k]`` and ``up = sum_k Tm[t, k] U[F + n, k]``. ``T_BUCKET``
    only keys the autotuning."""
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    col_ok = cols < F
    acc_g = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        k = k0 + rk
        k_ok = k < R
        a = _operand(tl.load(Tm + rows[:, None] * R + k[None, :],
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0), DOT_FP32)
        w_mask = k_ok[:, None] & col_ok[None, :]
        wg = tl.load(U + cols[None, :] * R + k[:, None], mask=w_mask, other=0.0)
        wu = tl.load(U + (cols[None, :] + F) * R + k[:, None], mask=w_mask, other=0.0)
        acc_g = tl.dot(a, _operand(wg, DOT_FP32), acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, _operand(wu, DOT_FP32), acc_u, input_precision=DOT_PRECISION)
    e = tl.exp(-tl.abs(acc_g))  # sigmoid without overflow: exp of a non-positive number
    out = acc_g * tl.where(acc_g >= 0, 1.0 / (1.0 + e), e / (1.0 + e)) * acc_u
    tl.store(OUT + rows[:, None] * F + cols[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


_swiglu_up_tuned = tuned(_swiglu_up_kernel, [
    triton.Config(dict(BLOCK_T=128, BLOCK_N=64, BLOCK_K=64), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_T=64, BLOCK_N=128, BLOCK_K=64), num_warps=4, num_stages=3),
    triton.Config(dict(BLOCK_T=128, BLOCK_N=128, BLOCK_K=32), num_warps=8, num_stages=3),
], key=["F", "R", "T_BUCKET"])


def swiglu_up_triton(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [T, f], t [T, r])`` for validated, contiguous ``x [T, d]``, ``v [b, r/b, d/b]``
    and ``u [2f, r]``."""
    T = x.shape[0]
    b, rb, p = v.shape
    r = b * rb
    f = u.shape[0] // 2
    t = torch.empty(T, r, dtype=x.dtype, device=x.device)
    out = torch.empty(T, f, dtype=x.dtype, device=x.device)
    if T == 0:
        return out, t
    block_matmul(x, (b * p, p, 1), v, (rb * p, 1, p), t, (r, rb, 1), T, rb, p, b)
    args = (t, u, out, T, f, r, bucket(T))
    if not use_tuned(T):
        block_t, block_n = _tiles(T, high=64), _tiles(f, high=64)
        with _on(x.device):
            _swiglu_up_kernel[(triton.cdiv(T, block_t), triton.cdiv(f, block_n))](
                *args, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=_tiles(r, high=32),
                **_dot_flags(x), num_warps=4, num_stages=3)
        return out, t
    with _on(x.device):
        _swiglu_up_tuned[lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),
                                       triton.cdiv(f, meta["BLOCK_N"]))](*args, **_dot_flags(x))
    return out, t
