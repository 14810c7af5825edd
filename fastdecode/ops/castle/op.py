"""The CASTLE custom ops (``fastdecode::castle_attention``, its backward and
``fastdecode::castle_decode``): their backends (the plain-torch ones and the Triton kernels of
``fastdecode.triton_kernels.castle``), fake implementations for tracing, and the autograd of the
parallel form. They take validated arguments: the public functions check them first."""

from __future__ import annotations

import torch

from fastdecode._backend import dispatch, register, run
from fastdecode.ops.castle.blocked import (
    castle_attention_backward_blocked,
    castle_attention_blocked,
)
from fastdecode.ops.castle.chunked import castle_decode_reference
from fastdecode.ops.castle.contract import state_dtype


# ---- the parallel form -----------------------------------------------------------------------


def _forward_triton(qc, kc, vc, qu, ku, vu, window: int, scale: float):
    # Imported on first use: triton is optional, and importing it costs time.
    from fastdecode.triton_kernels.castle.parallel import castle_forward_triton

    return castle_forward_triton(qc, kc, vc, qu, ku, vu, window, scale)


def _backward_triton(dout, qc, kc, vc, qu, ku, vu, out, lse, ul, window: int, scale: float):
    from fastdecode.triton_kernels.castle.parallel import castle_backward_triton

    return castle_backward_triton(dout, qc, kc, vc, qu, ku, vu, out, lse, ul, window, scale)


register("castle_attention", "torch")(castle_attention_blocked)
register("castle_attention", "triton")(_forward_triton)
register("castle_attention_backward", "torch")(castle_attention_backward_blocked)
register("castle_attention_backward", "triton")(_backward_triton)


@torch.library.custom_op("fastdecode::castle_attention", mutates_args=())
def castle_attention_op(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, qu: torch.Tensor,
                        ku: torch.Tensor, vu: torch.Tensor, window: int, scale: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The parallel form on ``[B, H, L, D]`` inputs: ``(out, lse, ul)``, out ``[B, H, L, D]``
    in the inputs' dtype, the log-sum-exp ``[B, H, L]`` and the final lookahead keys
    ``[B, H, L, D]`` in the state dtype; ``window`` is
    :data:`~fastdecode.ops.castle.contract.NO_WINDOW` or W >= 0."""
    out, lse, ul = run("castle_attention", qc.device, qc, kc, vc, qu, ku, vu, window, scale)
    return out, lse, ul


@castle_attention_op.register_fake
def _(qc, kc, vc, qu, ku, vu, window, scale):
    B, H, L, D = qc.shape
    sd = state_dtype(qc.dtype)
    return (torch.empty_like(qc), qc.new_empty(B, H, L, dtype=sd),
            qc.new_empty(B, H, L, D, dtype=sd))


@torch.library.custom_op("fastdecode::castle_attention_backward", mutates_args=())
def castle_attention_backward_op(dout: torch.Tensor, qc: torch.Tensor, kc: torch.Tensor,
                                 vc: torch.Tensor, qu: torch.Tensor, ku: torch.Tensor,
                                 vu: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                 ul: torch.Tensor, window: int, scale: float
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                            torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of the six inputs of :func:`castle_attention_op` (their shapes and
    dtypes) given ``dout`` ``[B, H, L, D]`` and the forward's inputs and outputs."""
    return run("castle_attention_backward", qc.device, dout, qc, kc, vc, qu, ku, vu, out, lse, ul,
               window, scale)


@castle_attention_backward_op.register_fake
def _(dout, qc, kc, vc, qu, ku, vu, out, lse, ul, window, scale):
    return tuple(torch.empty_like(x) for x in (qc, kc, vc, qu, ku, vu))


def _setup_context(ctx, inputs, output) -> None:
    qc, kc, vc, qu, ku, vu, window, scale = inputs
    ctx.save_for_backward(qc, kc, vc, qu, ku, vu, *output)
    ctx.window, ctx.scale = window, scale


def _backward(ctx, dout, _dlse, _dul):
    qc, kc, vc, qu, ku, vu, out, lse, ul = ctx.saved_tensors
    grads = dispatch("castle_attention_backward", castle_attention_backward_op, qc.device,
                     dout.contiguous(), qc, kc, vc, qu, ku, vu, out, lse, ul, ctx.window,
                     ctx.scale)
    return (*grads, None, None)


# Gradients flow to the six inputs only (the log-sum-exp and U^L are by-products).
castle_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---- one decoding step -----------------------------------------------------------------------


def _decode_triton(u, qu_cache, qu_base: int, kc_cache, vc_cache, t0: int, qc, ku, vu,
                   window: int, scale: float) -> torch.Tensor:
    from fastdecode.triton_kernels.castle.decode import castle_decode_triton

    return castle_decode_triton(u, qu_cache, qu_base, kc_cache, vc_cache, t0, qc, ku, vu, window,
                                scale)


register("castle_decode", "torch")(castle_decode_reference)
register("castle_decode", "triton")(_decode_triton)


@torch.library.custom_op("fastdecode::castle_decode", mutates_args=("u",))
def castle_decode_op(u: torch.Tensor, qu_cache: torch.Tensor, qu_base: int,
                     kc_cache: torch.Tensor, vc_cache: torch.Tensor, t0: int, qc: torch.Tensor,
                     ku: torch.Tensor, vu: torch.Tensor, window: int, scale: float
                     ) -> torch.Tensor:
    """One decoding step on a layer's cache buffers, ``u`` updated in place; the arguments and
    the result are those of :func:`~fastdecode.ops.castle.chunked.castle_chunk_reference`."""
    return run("castle_decode", qc.device, u, qu_cache, qu_base, kc_cache, vc_cache, t0, qc, ku,
               vu, window, scale)


@castle_decode_op.register_fake
def _(u, qu_cache, qu_base, kc_cache, vc_cache, t0, qc, ku, vu, window, scale):
    return torch.empty_like(qc)
