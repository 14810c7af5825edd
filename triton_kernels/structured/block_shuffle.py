"""BlockShuffle (Monarch) kernels for prefill and training. The op, its index maps and its
plain-torch reference live in :mod:`fastdecode.ops.structured`.

Layout. ``x [T, b*p]``, ``w1 [b, m, p]``, ``w2 [b, s, m]`` contiguous. Stage 1 writes
``h[k*m + i]``; stage 2 block j reads ``z_j[i] = h[i*b + j]`` and writes ``y[o*b + j]``. Every
permutation here is an affine map of (block, element), so the kernels fold them into their
pointer arithmetic and no permuted copy is ever made.

Forward: one kernel, both stages. A program owns a tile of BLOCK_T tokens and one stage-2 block
j. It first computes its z_j tile (m values per token) straight in the shuffled order: z_j[i]
needs stage-1 block ``k = (i*b + j) // m`` row ``(i*b + j) % m``, so each chunk of i runs one
masked GEMM per stage-1 block it touches (usually one). It stores z_j in the z layout
``[T, b, m]`` (kept for the backward), waits at a block barrier, reads it back (L1/L2 resident)
and runs stage 2, storing y through the output interleave.

Backward: one kernel for the data path and two for the weights. A program of
:func:`_block_shuffle_bwd_kernel` owns a token tile and one stage-1 block k. The rows of h in
block k are ``r = i*b + j`` for every stage-2 block j and a CONTIGUOUS range of i
(``ceil((k*m - j)/b) <= i < ceil(((k+1)*m - j)/b)``), so it computes its gradient of h,
``gh[r] = sum_o gy[o*b + j] w2[j, o, i]``, as b plain GEMMs over those ranges (no work is
repeated across programs), stores it in the h layout (kept for w1's gradient), waits at a
block barrier and applies ``w1[k]`` to get x's gradient for input slice k. The weight
gradients reduce over tokens: two launches of :func:`block_matmul`, a GEMM over strided index
maps.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _operand(x, DOT_FP32: tl.constexpr):
    """``x`` as a ``tl.dot`` operand: fp32 with DOT_FP32 (the interpreter's dot multiplies
    bf16 tiles' raw bits), else unchanged."""
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


TUNE_FROM = 2048
"""Launches whose token count (or reduction length) reaches this are autotuned on the GPU; the
smaller ones take fixed tiles (autotuning compiles every config, which only large calls
repay)."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_tuned(n: int) -> bool:
    """Whether a launch over ``n`` tokens takes the autotuned kernel."""
    return n >= TUNE_FROM and not interpreting()


def tuned(kernel, configs: list[triton.Config], key: list[str]):
    """``kernel`` autotuned over a few ``configs`` (GPU launches); keyed on ``key``, which
    names size arguments and power-of-two buckets of the token count, so that a new T in the
    same bucket reuses the tuned config."""
    return triton.autotune(configs=configs, key=key)(kernel)


def bucket(n: int) -> int:
    """The power-of-two bucket of ``n`` (an autotuning key)."""
    return triton.next_power_of_2(max(n, 1))


@triton.jit
def _block_mm_kernel(A, W, C, M, N, K, M_BUCKET, K_BUCKET,
                     sam, sag, sak, swg, swk, swn, scm, scg, scn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), G)``:
    ``C[m*scm + g*scg + n*scn] = sum_k A[m*sam + g*sag + k*sak] * W[g*swg + k*swk + n*swn]``,
    fp32 accumulation, stored in C's dtype. ``M_BUCKET`` and ``K_BUCKET`` only key the
    autotuning."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    a_base = A + g * sag + rm[:, None] * sam
    w_base = W + g * swg + rn[None, :] * swn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        a = tl.load(a_base + k[None, :] * sak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + k[:, None] * swk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if a.dtype != w.dtype:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(_operand(a, DOT_FP32), _operand(w, DOT_FP32), acc,
                     input_precision=DOT_PRECISION)
    c_ptrs = C + g * scg + rm[:, None] * scm + rn[None, :] * scn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_block_mm_tuned = tuned(_block_mm_kernel, [
    triton.Config(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), num_warps=4, num_stages=3),
    triton.Config(dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), num_warps=4, num_stages=3),
], key=["N", "M_BUCKET", "K_BUCKET"])


@triton.jit
def _block_shuffle_fwd_kernel(X, W1, W2, Z, Y, T, NB, P, M, S, T_BUCKET,
                              BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
                              DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Grid ``(cdiv(T, BLOCK_T), b)``: both stages for BLOCK_T tokens and stage-2 block j.
    Writes ``Z[t, j, :]`` (x's dtype) and ``Y[t, o*b + j]`` for every o. ``T_BUCKET`` only
    keys the autotuning."""
    pid_t = tl.program_id(0)
    j = tl.program_id(1)
    rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    row_ok = rows < T
    offs_i = tl.arange(0, BLOCK_I)
    offs_c = tl.arange(0, BLOCK_C)
    offs_o = tl.arange(0, BLOCK_O)
    x_rows = X + rows[:, None] * (NB * P)
    z_rows = Z + rows[:, None] * (NB * M) + j * M

    # Stage 1 in shuffled order: z_j[i] = h[r], r = i*b + j, from block r // m, row r % m.
    for i0 in range(0, M, BLOCK_I):
        i = i0 + offs_i
        i_ok = i < M
        r = i * NB + j
        blk = r // M
        w1_rows = W1 + (r % M).to(tl.int64) * P
        k_first = (i0 * NB + j) // M
        k_last = ((tl.minimum(i0 + BLOCK_I, M) - 1) * NB + j) // M
        acc = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
        for k in range(k_first, k_last + 1):
            sel = i_ok & (blk == k)
            for c0 in range(0, P, BLOCK_C):
                c = c0 + offs_c
                c_ok = c < P
                xt = tl.load(x_rows + k * P + c[None, :], mask=row_ok[:, None] & c_ok[None, :],
                             other=0.0)
                wt = tl.load(w1_rows[None, :] + k * M * P + c[:, None],
                             mask=c_ok[:, None] & sel[None, :], other=0.0)
                acc = tl.dot(_operand(xt, DOT_FP32), _operand(wt, DOT_FP32), acc,
                             input_precision=DOT_PRECISION)
        tl.store(z_rows + i[None, :], acc.to(Z.dtype.element_ty),
                 mask=row_ok[:, None] & i_ok[None, :])
    tl.debug_barrier()  # this program's z_j stores are visible to all its threads

    # Stage 2: u_j = z_j w2_j^T, stored interleaved: y[o*b + j].
    w2_block = W2 + j.to(tl.int64) * S * M
    for o0 in range(0, S, BLOCK_O):
        o = o0 + offs_o
        o_ok = o < S
        acc = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
        for i0 in range(0, M, BLOCK_I):
            i = i0 + offs_i
            i_ok = i < M
            zt = tl.load(z_rows + i[None, :], mask=row_ok[:, None] & i_ok[None, :], other=0.0)
            wt = tl.load(w2_block + o[None, :].to(tl.int64) * M + i[:, None],
                         mask=i_ok[:, None] & o_ok[None, :], other=0.0)
            acc = tl.dot(_operand(zt, DOT_FP32), _operand(wt, DOT_FP32), acc,
                         input_precision=DOT_PRECISION)
        tl.store(Y + rows[:, None] * (NB * S) + o[None, :] * NB + j, acc.to(Y.dtype.element_ty),
                 mask=row_ok[:, None] & o_ok[None, :])


_block_shuffle_fwd_tuned = tuned(_block_shuffle_fwd_kernel, [
    triton.Config(dict(BLOCK_T=128, BLOCK_I=64, BLOCK_C=64, BLOCK_O=128), num_warps=8,
                  num_stages=3),
    triton.Config(dict(BLOCK_T=64, BLOCK_I=64, BLOCK_C=64, BLOCK_O=128), num_warps=4,
                  num_stages=3),
    triton.Config(dict(BLOCK_T=128, BLOCK_I=64, BLOCK_C=32, BLOCK_O=64), num_warps=4,
                  num_stages=3),
], key=["NB", "P", "M", "S", "T_BUCKET"])


@triton.jit
def _block_shuffle_bwd_kernel(GY, W1, W2, GH, GX, T, NB, P, M, S, T_BUCKET,
                              BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
                              DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Grid ``(cdiv(T, BLOCK_T), b)``: for BLOCK_T tokens and stage-1 block k, writes
    ``GH[t, k*m : (k+1)*m]`` (the gradient of h, GY's dtype) and ``GX[t, k*p : (k+1)*p]``.
    ``T_BUCKET`` only keys the autotuning."""
    pid_t = tl.program_id(0)
    k = tl.program_id(1)
    rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    row_ok = rows < T
    offs_i = tl.arange(0, BLOCK_I)
    offs_c = tl.arange(0, BLOCK_C)
    offs_o = tl.arange(0, BLOCK_O)
    gy_rows = GY + rows[:, None] * (NB * S)
    gh_rows = GH + rows[:, None] * (NB * M)

    # gh[r] for the rows r = i*b + j of block k: per j, a contiguous range of i.
    for j in range(0, NB):
        i_lo = (k * M - j + NB - 1) // NB
        i_hi = ((k + 1) * M - j + NB - 1) // NB
        w2_block = W2 + j * S * M
        for i0 in range(i_lo, i_hi, BLOCK_I):
            i = i0 + offs_i
            i_ok = i < i_hi
            acc = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
            for o0 in range(0, S, BLOCK_O):
                o = o0 + offs_o
                o_ok = o < S
                g = tl.load(gy_rows + o[None, :] * NB + j, mask=row_ok[:, None] & o_ok[None, :],
                            other=0.0)
                w = tl.load(w2_block + o[:, None].to(tl.int64) * M + i[None, :],
                            mask=o_ok[:, None] & i_ok[None, :], other=0.0)
                acc = tl.dot(_operand(g, DOT_FP32), _operand(w, DOT_FP32), acc,
                             input_precision=DOT_PRECISION)
            tl.store(gh_rows + i[None, :] * NB + j, acc.to(GH.dtype.element_ty),
                     mask=row_ok[:, None] & i_ok[None, :])
    tl.debug_barrier()  # this program's gh stores are visible to all its threads

    # gx[k*p + c] = sum_i gh[k*m + i] w1[k, i, c].
    w1_block = W1 + k.to(tl.int64) * M * P
    for c0 in range(0, P, BLOCK_C):
        c = c0 + offs_c
        c_ok = c < P
        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for i0 in range(0, M, BLOCK_I):
            i = i0 + offs_i
            i_ok = i < M
            h = tl.load(gh_rows + k * M + i[None, :], mask=row_ok[:, None] & i_ok[None, :],
                        other=0.0)
            w = tl.load(w1_block + i[:, None].to(tl.int64) * P + c[None, :],
                        mask=i_ok[:, None] & c_ok[None, :], other=0.0)
            acc = tl.dot(_operand(h, DOT_FP32), _operand(w, DOT_FP32), acc,
                         input_precision=DOT_PRECISION)
        tl.store(GX + rows[:, None] * (NB * P) + k * P + c[None, :], acc.to(GX.dtype.element_ty),
                 mask=row_ok[:, None] & c_ok[None, :])


_block_shuffle_bwd_tuned = tuned(_block_shuffle_bwd_kernel, _block_shuffle_fwd_tuned.configs,
                                 key=["NB", "P", "M", "S", "T_BUCKET"])


def _tiles(n: int, low: int = 16, high: int = 64) -> int:
    return min(high, max(low, triton.next_power_of_2(n)))


def _dot_flags(*tensors: torch.Tensor) -> dict:
    """The dot precision (fp32 inputs: three tf32 products) and whether to widen operands to
    fp32 (bf16 under the interpreter)."""
    fp32 = any(t.dtype == torch.float32 for t in tensors)
    bf16_cpu = any(t.dtype == torch.bfloat16 and not t.is_cuda for t in tensors)
    return dict(DOT_PRECISION="tf32x3" if fp32 else "tf32", DOT_FP32=bf16_cpu)


def _on(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def block_matmul(a: torch.Tensor, a_strides: tuple[int, int, int], w: torch.Tensor,
                 w_strides: tuple[int, int, int], c: torch.Tensor,
                 c_strides: tuple[int, int, int], M: int, N: int, K: int, G: int) -> None:
    """For every group g < G: ``C[g][m, n] = sum_k A[g][m, k] W[g][k, n]`` where the element
    offsets are ``A: m*sam + g*sag + k*sak``, ``W: g*swg + k*swk + n*swn`` and
    ``C: m*scm + g*scg + n*scn`` (the strides given as ``(sam, sag, sak)``, ``(swg, swk, swn)``
    and ``(scm, scg, scn)``, in elements). Writes into ``c``; fp32 accumulation."""
    if M == 0 or N == 0 or G == 0:
        return
    args = (a, w, c, M, N, K, bucket(M), bucket(K), *a_strides, *w_strides, *c_strides)
    if not use_tuned(max(M, K)):  # tiles fitted to the (small) sizes
        block_m, block_n, block_k = _tiles(M, high=64), _tiles(N, high=64), _tiles(K, high=32)
        with _on(a.device):
            _block_mm_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n), G)](
                *args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **_dot_flags(a, w),
                num_warps=4, num_stages=3)
        return
    with _on(a.device):
        _block_mm_tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),
                                      triton.cdiv(N, meta["BLOCK_N"]), G)](
            *args, **_dot_flags(a, w))


def block_shuffle_triton(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused forward on validated, contiguous arguments: ``(y [T, b*s], z [T, b, m])``."""
    T = x.shape[0]
    b, m, p = w1.shape
    s = w2.shape[1]
    y = torch.empty(T, b * s, dtype=x.dtype, device=x.device)
    z = torch.empty(T, b, m, dtype=x.dtype, device=x.device)
    if T == 0:
        return y, z
    args = (x, w1, w2, z, y, T, b, p, m, s, bucket(T))
    if not use_tuned(T):
        block_t = _tiles(T, high=64)
        with _on(x.device):
            _block_shuffle_fwd_kernel[(triton.cdiv(T, block_t), b)](
                *args, BLOCK_T=block_t, BLOCK_I=_tiles(m, high=64), BLOCK_C=_tiles(p, high=32),
                BLOCK_O=_tiles(s, high=64), **_dot_flags(x), num_warps=4, num_stages=2)
        return y, z
    with _on(x.device):
        _block_shuffle_fwd_tuned[lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), b)](
            *args, **_dot_flags(x))
    return y, z


def block_shuffle_backward_triton(gy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor,
                                  w2: torch.Tensor, z: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gx, gw1, gw2)`` for contiguous ``gy [T, b*s]``, ``x``, ``w1``, ``w2`` and the saved
    ``z [T, b, m]``. The gradient of z goes straight into the h layout (x's dtype)."""
    T = x.shape[0]
    b, m, p = w1.shape
    s = w2.shape[1]
    gh = torch.empty(T, b * m, dtype=x.dtype, device=x.device)
    gx = torch.empty_like(x)
    gw1 = torch.empty_like(w1)
    gw2 = torch.empty_like(w2)
    if T == 0:
        return gx, gw1.zero_(), gw2.zero_()
    args = (gy, w1, w2, gh, gx, T, b, p, m, s, bucket(T))
    with _on(x.device):
        if use_tuned(T):
            _block_shuffle_bwd_tuned[lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), b)](
                *args, **_dot_flags(x))
        else:
            block_t = _tiles(T, high=64)
            _block_shuffle_bwd_kernel[(triton.cdiv(T, block_t), b)](
                *args, BLOCK_T=block_t, BLOCK_I=_tiles(m, high=64), BLOCK_C=_tiles(p, high=64),
                BLOCK_O=_tiles(s, high=32), **_dot_flags(x), num_warps=4, num_stages=2)
    # gw2[j, o, i] = sum_t gy[t, o*b + j] z[t, j, i].
    block_matmul(gy, (b, 1, b * s), z, (m, b * m, 1), gw2, (m, s * m, 1), s, m, T, b)
    # gw1[k, i, c] = sum_t gh[t, k*m + i] x[t, k*p + c].
    block_matmul(gh, (1, m, b * m), x, (p, b * p, 1), gw1, (p, m * p, 1), m, p, T, b)
    return gx, gw1, gw2
