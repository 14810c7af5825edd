""":func:`castle_attention`, CASTLE's parallel (training) form: validated arguments into the
``fastdecode::castle_attention`` custom op, differentiable."""

from __future__ import annotations

import torch

from fastdecode._backend import dispatch
from fastdecode.ops.castle.contract import check_scale, check_six, check_window
from fastdecode.ops.castle.op import castle_attention_op


def castle_attention(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, qu: torch.Tensor,
                     ku: torch.Tensor, vu: torch.Tensor, *, window: int | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """CASTLE attention over whole sequences (the paper's parallel form), differentiable.

    Row t of the output is ``sum_s p_{t,s} vc_s`` over ``s <= t`` with
    ``p_t = softmax_s(c qc_t . kc_s - SiLU(c qc_t . u_s^t))`` and the lookahead keys
    ``u_s^t = sum_{s < r <= t} sigmoid(c qu_s . ku_r) vu_r`` (with ``window=W`` only
    ``r <= s + W``). ``vu = 0`` or ``window=0`` gives standard causal attention.

    Args:
        qc, kc, vc: ``[B, H, L, D]`` causal queries, causal keys and values.
        qu, ku, vu: ``[B, H, L, D]`` lookahead queries, lookahead keys and lookahead values.
            All six share shape, dtype (float16, bfloat16, float32; float64 for gradient
            checks) and device; D is a multiple of 16 in [16, 256]; L >= 1 (any value); any
            strides (a tensor whose last stride is not 1 is copied). Apply rotary embeddings
            before the call if the model uses them.
        window: None for full lookahead, or W >= 0 for sliding-window lookahead (CASTLE-SWL).
        scale: ``c``, default ``1 / sqrt(D)``.

    Returns:
        ``[B, H, L, D]`` contiguous, the inputs' dtype. Accumulation and the lookahead keys are
        fp32 (fp64 for fp64 inputs). Gradients flow to all six inputs.
    """
    tensors = check_six((qc, kc, vc, qu, ku, vu), "[B, H, L, D]")
    window = check_window(window)
    scale = check_scale(scale, qc.shape[3])
    if qc.shape[2] == 0:
        raise ValueError(f"qc must have L >= 1 tokens, found shape {tuple(qc.shape)}")
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return castle_attention_op(*tensors, window, scale)[0]  # through its autograd
    return dispatch("castle_attention", castle_attention_op, qc.device, *tensors, window,
                    scale)[0]
