"""Structured linear layers' ops ("Building on Efficient Foundations", Wei et al. 2024): the
BlockShuffle (Monarch) product, the low-rank / block-dense up-projection fused with SwiGLU, and
the small-batch decoding products of every structure and of a merged dense weight.

This file holds each op's plain-torch reference (the ``torch`` backend), the registration of the
Triton kernels (``triton`` backend, in ``fastdecode.triton_kernels.structured``), the
``torch.library`` registrations with their autograd (``register_autograd``, as the CASTLE ops)
and the public, validated entry points.

Weight layouts (``nn.Linear`` convention, out x in, activations are rows ``y = x @ W.T``):

* LowRank: ``v [r, d_in]``, ``u [d_out, r]``; ``y = (x @ v.T) @ u.T``.
* BlockDense: ``v [b, r/b, d_in/b]`` (block k reads input slice k and writes rank slice k),
  ``u [d_out, r]``; LowRank is the case b = 1 with ``v[None]``.
* BlockShuffle: ``w1 [b, m, p]`` and ``w2 [b, s, m]`` with ``p = d_in/b``, ``s = d_out/b`` and
  ``m = min(p, s)``. Per token, with 0-based indices::

      h[k*m + i] = sum_c w1[k, i, c] * x[k*p + c]      stage 1, block-major
      z_j[i]     = h[i*b + j]                            the shuffle, a stride-b gather
      y[o*b + j] = sum_i w2[j, o, i] * z_j[i]            stage 2, outputs interleaved

  Both permutations are strided views, so the kernels read and write through them instead of
  copying.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdecode._backend import dispatch, register, run
from fastdecode.ops import _validate

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes the ops take. fp64 (for gradcheck) runs on the ``torch`` backend only: the
``triton`` backend takes :data:`TRITON_DTYPES`, so the automatic choice passes over it for fp64
and forcing it (``use_backend("triton")``, ``FASTDECODE_BACKEND=triton``) raises
:class:`~fastdecode.BackendUnavailableError`."""
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""The dtypes the Triton kernels take."""
MAX_DECODE_TOKENS = 16
"""The decoding products take 1 to this many tokens (rows of ``x``)."""


# ---- plain-torch references (the ``torch`` backend) -----------------------------------------


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the accumulation dtype: fp64 stays fp64, everything else becomes fp32."""
    return t if t.dtype == torch.float64 else t.float()


def block_shuffle_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [T, b*s], z [T, b, m])``: the BlockShuffle product and its shuffled stage-1 output
    ``z[t, j, i] = h[t, i*b + j]`` (saved for the backward), both in x's dtype; fp32 math, z
    rounded to x's dtype before stage 2 as the kernel does."""
    b, m, p = w1.shape
    s = w2.shape[1]
    T = x.shape[0]
    h = torch.einsum("tkc,kic->tki", _wide(x).reshape(T, b, p), _wide(w1))  # [T, b, m]
    z = h.reshape(T, m, b).transpose(1, 2).to(x.dtype)  # z[t, j, i] = h[t, i*b + j]
    u = torch.einsum("tji,joi->tjo", _wide(z), _wide(w2))  # [T, b, s]
    y = u.transpose(1, 2).reshape(T, s * b)  # y[t, o*b + j] = u[t, j, o]
    return y.to(x.dtype), z.contiguous()


def block_shuffle_backward_reference(gy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor,
                                     w2: torch.Tensor, z: torch.Tensor
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gx, gw1, gw2)`` of :func:`block_shuffle_reference` given ``gy [T, b*s]``; fp32 math,
    the gradient of h rounded to x's dtype as the kernel stores it."""
    b, m, p = w1.shape
    s = w2.shape[1]
    T = x.shape[0]
    gu = _wide(gy).reshape(T, s, b).transpose(1, 2)  # [T, b, s]: gu[t, j, o] = gy[t, o*b + j]
    gw2 = torch.einsum("tjo,tji->joi", gu, _wide(z))
    gz = torch.einsum("tjo,joi->tji", gu, _wide(w2))  # [T, b, m]
    gh = _wide(gz.transpose(1, 2).reshape(T, b, m).to(x.dtype))  # h layout [T, k, i]
    gw1 = torch.einsum("tki,tkc->kic", gh, _wide(x).reshape(T, b, p))
    gx = torch.einsum("tki,kic->tkc", gh, _wide(w1)).reshape(T, b * p)
    return gx.to(x.dtype), gw1.to(w1.dtype), gw2.to(w2.dtype)


def block_diag_reference(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[T, b*r_b]``: ``x [T, b*p]`` times ``block_diag(*v).T`` for ``v [b, r_b, p]``, fp32
    math, x's dtype."""
    b, rb, p = v.shape
    T = x.shape[0]
    t = torch.einsum("tkc,krc->tkr", _wide(x).reshape(T, b, p), _wide(v))
    return t.reshape(T, b * rb).to(x.dtype)


def swiglu_up_reference(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [T, f], t [T, r])``: ``t = block_diag(v) x`` (x's dtype), ``[gate, up] = t @ u.T``
    in fp32 and ``out = silu(gate) * up`` in x's dtype."""
    t = block_diag_reference(x, v)
    gu = _wide(t) @ _wide(u).T
    gate, up = gu.chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype), t


def dense_decode_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` with fp32 accumulation, x's dtype."""
    return (_wide(x) @ _wide(w).T).to(x.dtype)


def block_dense_decode_reference(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor
                                 ) -> torch.Tensor:
    """``(block_diag(v) x) u.T``; the rank-r intermediate stays fp32 as in the kernel."""
    b, rb, p = v.shape
    T = x.shape[0]
    t = torch.einsum("tkc,krc->tkr", _wide(x).reshape(T, b, p), _wide(v)).reshape(T, b * rb)
    return (t @ _wide(u).T).to(x.dtype)


def block_shuffle_decode_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
                                   ) -> torch.Tensor:
    """The BlockShuffle product with an fp32 intermediate (as the decoding kernels keep it)."""
    b, m, p = w1.shape
    s = w2.shape[1]
    T = x.shape[0]
    h = torch.einsum("tkc,kic->tki", _wide(x).reshape(T, b, p), _wide(w1))
    z = h.reshape(T, m, b).transpose(1, 2)
    u = torch.einsum("tji,joi->tjo", z, _wide(w2))
    return u.transpose(1, 2).reshape(T, s * b).to(x.dtype)


def _triton(name: str):
    """The ``triton`` backend of an op: kernel ``name`` of
    ``fastdecode.triton_kernels.structured``, imported on first use (triton is optional and
    importing it costs time)."""

    def impl(*args: torch.Tensor):
        from fastdecode.triton_kernels import structured

        return getattr(structured, name)(*args)

    return impl


register("block_shuffle", "torch")(block_shuffle_reference)
register("block_shuffle_backward", "torch")(block_shuffle_backward_reference)
register("swiglu_up", "torch")(swiglu_up_reference)
register("dense_decode", "torch")(dense_decode_reference)
register("block_dense_decode", "torch")(block_dense_decode_reference)
register("block_shuffle_decode", "torch")(block_shuffle_decode_reference)
for _op in ("block_shuffle", "block_shuffle_backward", "swiglu_up", "dense_decode",
            "block_dense_decode", "block_shuffle_decode"):
    register(_op, "triton", dtypes=TRITON_DTYPES)(_triton(f"{_op}_triton"))
del _op


# ---- torch.library registration (opaque to torch.compile, with fake implementations) --------


@torch.library.custom_op("fastdecode::block_shuffle", mutates_args=())
def _block_shuffle_op(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    return run("block_shuffle", x.device, x, w1, w2)


@_block_shuffle_op.register_fake
def _(x, w1, w2):
    b, m, _ = w1.shape
    return x.new_empty(x.shape[0], b * w2.shape[1]), x.new_empty(x.shape[0], b, m)


@torch.library.custom_op("fastdecode::block_shuffle_backward", mutates_args=())
def _block_shuffle_backward_op(gy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor,
                               w2: torch.Tensor, z: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return run("block_shuffle_backward", x.device, gy, x, w1, w2, z)


@_block_shuffle_backward_op.register_fake
def _(gy, x, w1, w2, z):
    return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2)


@torch.library.custom_op("fastdecode::swiglu_up", mutates_args=())
def _swiglu_up_op(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    return run("swiglu_up", x.device, x, v, u)


@_swiglu_up_op.register_fake
def _(x, v, u):
    return x.new_empty(x.shape[0], u.shape[0] // 2), x.new_empty(x.shape[0], u.shape[1])


@torch.library.custom_op("fastdecode::dense_decode", mutates_args=())
def _dense_decode_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return run("dense_decode", x.device, x, w)


@_dense_decode_op.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("fastdecode::block_dense_decode", mutates_args=())
def _block_dense_decode_op(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return run("block_dense_decode", x.device, x, v, u)


@_block_dense_decode_op.register_fake
def _(x, v, u):
    return x.new_empty(x.shape[0], u.shape[0])


@torch.library.custom_op("fastdecode::block_shuffle_decode", mutates_args=())
def _block_shuffle_decode_op(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
                             ) -> torch.Tensor:
    return run("block_shuffle_decode", x.device, x, w1, w2)


@_block_shuffle_decode_op.register_fake
def _(x, w1, w2):
    return x.new_empty(x.shape[0], w1.shape[0] * w2.shape[1])


# ---- autograd of block_shuffle and swiglu_up (register_autograd, as the CASTLE ops) ---------


def _block_shuffle_setup_context(ctx, inputs, output) -> None:
    x, w1, w2 = inputs
    ctx.save_for_backward(x, w1, w2, output[1])


def _block_shuffle_backward(ctx, gy: torch.Tensor, _gz: torch.Tensor | None):
    # z is a by-product saved for this backward: gradients flow through y only.
    x, w1, w2, z = ctx.saved_tensors
    return dispatch("block_shuffle_backward", _block_shuffle_backward_op, x.device,
                    gy.contiguous(), x, w1, w2, z)


_block_shuffle_op.register_autograd(_block_shuffle_backward,
                                    setup_context=_block_shuffle_setup_context)


def _swiglu_up_setup_context(ctx, inputs, output) -> None:
    x, v, u = inputs
    ctx.save_for_backward(x, v, u, output[1])


def _swiglu_up_backward(ctx, gout: torch.Tensor, _gt: torch.Tensor | None):
    # Plain torch: recomputes gate and up from the saved rank-r intermediate t (a by-product:
    # gradients flow through the output only).
    x, v, u, t = ctx.saved_tensors
    b, rb, p = v.shape
    T = x.shape[0]
    gate, up = (_wide(t) @ _wide(u).T).chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    g = _wide(gout)
    ggate = g * up * sig * (1 + gate * (1 - sig))
    gup = g * gate * sig
    gu_all = torch.cat([ggate, gup], dim=-1)  # [T, 2f]
    gu = gu_all.T @ _wide(t)
    gt = _wide((gu_all @ _wide(u)).to(x.dtype)).reshape(T, b, rb)
    xb = _wide(x).reshape(T, b, p)
    gv = torch.einsum("tkr,tkc->krc", gt, xb)
    gx = torch.einsum("tkr,krc->tkc", gt, _wide(v)).reshape(T, b * p)
    return gx.to(x.dtype), gv.to(v.dtype), gu.to(u.dtype)


_swiglu_up_op.register_autograd(_swiglu_up_backward, setup_context=_swiglu_up_setup_context)


# ---- validation -----------------------------------------------------------------------------


def _check_x(x: object, max_tokens: int | None = None) -> torch.Tensor:
    _validate.tensor("x", x, None, 2, "[T, d_in]")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must have dtype float16, bfloat16, float32 or float64, found "
                        f"{x.dtype}")
    if max_tokens is not None and not 1 <= x.shape[0] <= max_tokens:
        raise ValueError(f"x must have T in [1, {max_tokens}] rows for a decoding product, "
                         f"found shape {tuple(x.shape)}")
    return x


def _check_weight(name: str, w: object, x: torch.Tensor, ndim: int, layout: str) -> None:
    _validate.tensor(name, w, x.dtype, ndim, layout)
    if w.numel() == 0:
        raise ValueError(f"{name} must not be empty, found shape {tuple(w.shape)}")


def _check_block_shuffle(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> None:
    _check_weight("w1", w1, x, 3, "[b, m, p]")
    _check_weight("w2", w2, x, 3, "[b, s, m]")
    b, m, p = w1.shape
    s = w2.shape[1]
    _validate.shape("w2", w2, (b, s, m), "[b, s, m]")
    if m != min(p, s):
        raise ValueError(f"w1 [b, m, p] = {tuple(w1.shape)} and w2 [b, s, m] = {tuple(w2.shape)} "
                         f"must have m = min(p, s) = {min(p, s)}, found m = {m}")
    if x.shape[1] != b * p:
        raise ValueError(f"x must have d_in = b*p = {b * p} columns for w1 {tuple(w1.shape)}, "
                         f"found shape {tuple(x.shape)}")
    _validate.same_device([("x", x), ("w1", w1), ("w2", w2)])


def _check_block_dense(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, u_rows: str) -> None:
    _check_weight("v", v, x, 3, "[b, r/b, d_in/b]")
    _check_weight("u", u, x, 2, f"[{u_rows}, r]")
    b, rb, p = v.shape
    if x.shape[1] != b * p:
        raise ValueError(f"x must have d_in = b*(d_in/b) = {b * p} columns for v "
                         f"{tuple(v.shape)}, found shape {tuple(x.shape)}")
    if u.shape[1] != b * rb:
        raise ValueError(f"u must have r = {b * rb} columns for v {tuple(v.shape)}, found "
                         f"shape {tuple(u.shape)}")
    _validate.same_device([("x", x), ("v", v), ("u", u)])


# ---- public entry points --------------------------------------------------------------------


def block_shuffle(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The BlockShuffle (Monarch) product ``y = P_out BD(w2) P_mid BD(w1) x`` of every row.

    Args:
        x: ``[T, d_in]`` fp16, bf16 or fp32 (made contiguous).
        w1: ``[b, m, p]``, x's dtype: stage 1's blocks, ``d_in = b*p``.
        w2: ``[b, s, m]``, x's dtype: stage 2's blocks, ``d_out = b*s``, ``m = min(p, s)``.

    All on one device. Index maps: module docstring. Differentiable in x, w1 and w2 (the
    backward is an op of its own with a Triton kernel); fp32 accumulation.

    Returns:
        ``[T, d_out]`` contiguous, x's dtype.
    """
    _check_x(x)
    _check_block_shuffle(x, w1, w2)
    x, w1, w2 = x.contiguous(), w1.contiguous(), w2.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w2.requires_grad):
        return _block_shuffle_op(x, w1, w2)[0]  # through its autograd
    return dispatch("block_shuffle", _block_shuffle_op, x.device, x, w1, w2)[0]


def swiglu_up(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A low-rank or block-dense FFN up-projection with SwiGLU: ``t = BD(v) x``,
    ``[gate, up] = u t`` and ``silu(gate) * up``.

    Args:
        x: ``[T, d]`` fp16, bf16 or fp32 (made contiguous).
        v: ``[b, r/b, d/b]``, x's dtype: the block-diagonal first factor (b = 1: low rank,
            ``v = V[None]``).
        u: ``[2f, r]``, x's dtype: gate rows ``[0, f)``, up rows ``[f, 2f)``.

    Differentiable in all three (the backward is plain torch, recomputing gate and up from the
    saved intermediate t); fp32 accumulation, t rounded to x's dtype.

    Returns:
        ``[T, f]`` contiguous, x's dtype.
    """
    _check_x(x)
    _check_block_dense(x, v, u, "2f")
    if u.shape[0] % 2:
        raise ValueError(f"u must have an even number 2f of rows (gate, then up), found shape "
                         f"{tuple(u.shape)}")
    x, v, u = x.contiguous(), v.contiguous(), u.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or v.requires_grad or u.requires_grad):
        return _swiglu_up_op(x, v, u)[0]  # through its autograd
    return dispatch("swiglu_up", _swiglu_up_op, x.device, x, v, u)[0]


def dense_decode(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for a decoding step's few rows (a merged structured weight, or any dense one).

    Args:
        x: ``[T, d_in]``, 1 <= T <= MAX_DECODE_TOKENS, fp16/bf16/fp32.
        w: ``[d_out, d_in]``, x's dtype.

    Not differentiable (inference). fp32 accumulation.

    Returns:
        ``[T, d_out]`` contiguous, x's dtype.
    """
    _check_x(x, MAX_DECODE_TOKENS)
    _check_weight("w", w, x, 2, "[d_out, d_in]")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w must have d_in = {x.shape[1]} columns, found shape {tuple(w.shape)}")
    _validate.same_device([("x", x), ("w", w)])
    return dispatch("dense_decode", _dense_decode_op, x.device, x.contiguous(), w.contiguous())


def block_dense_decode(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``u (BD(v) x)`` for a decoding step's few rows (BlockDense; LowRank with ``v[None]``).

    Args:
        x: ``[T, d_in]``, 1 <= T <= MAX_DECODE_TOKENS, fp16/bf16/fp32.
        v: ``[b, r/b, d_in/b]``, x's dtype.
        u: ``[d_out, r]``, x's dtype.

    Not differentiable. The rank-r intermediate is kept in fp32.

    Returns:
        ``[T, d_out]`` contiguous, x's dtype.
    """
    _check_x(x, MAX_DECODE_TOKENS)
    _check_block_dense(x, v, u, "d_out")
    return dispatch("block_dense_decode", _block_dense_decode_op, x.device, x.contiguous(),
                    v.contiguous(), u.contiguous())


def lowrank_decode(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``u (v x)`` for a decoding step's few rows: :func:`block_dense_decode` with one block.

    Args:
        x: ``[T, d_in]``, 1 <= T <= MAX_DECODE_TOKENS; v: ``[r, d_in]``; u: ``[d_out, r]``;
            one dtype (fp16/bf16/fp32) and device.

    Returns:
        ``[T, d_out]`` contiguous, x's dtype.
    """
    _validate.tensor("v", v, None, 2, "[r, d_in]")
    return block_dense_decode(x, v[None], u)


def block_shuffle_decode(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """:func:`block_shuffle` for a decoding step's few rows, with an fp32 intermediate.

    Args:
        x: ``[T, d_in]``, 1 <= T <= MAX_DECODE_TOKENS, fp16/bf16/fp32.
        w1: ``[b, m, p]``; w2: ``[b, s, m]``; x's dtype (see :func:`block_shuffle`).

    Not differentiable.

    Returns:
        ``[T, b*s]`` contiguous, x's dtype.
    """
    _check_x(x, MAX_DECODE_TOKENS)
    _check_block_shuffle(x, w1, w2)
    return dispatch("block_shuffle_decode", _block_shuffle_decode_op, x.device, x.contiguous(),
                    w1.contiguous(), w2.contiguous())
