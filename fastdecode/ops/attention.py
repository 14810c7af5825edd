"""Tree attention, the attention of every tree decoding step (Jacobi and trie lookahead): the T
tokens of a draft tree attend to their row's cached prefix and, through the packed tree mask,
to each other.

This file holds the op's plain-torch reference (the ``torch`` backend), the registration of the
Triton kernel (the ``triton`` backend, in ``fastdecode.triton_kernels.tree.attention``), its
``torch.library`` registration and its public, validated entry point.
"""

from __future__ import annotations

import math

import torch

from fastdecode._backend import dispatch, register, run
from fastdecode.ops import _validate
from fastdecode.ops.tree import MAX_TREE_NODES

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# ---- plain-torch reference (the ``torch`` backend) ------------------------------------------


def unpack_tree_mask(mask: torch.Tensor, T: int) -> torch.Tensor:
    """bool ``[B, T, T]`` from the packed int32 ``[B, T, ceil(T/32)]`` (inverse of
    :func:`fastdecode.ops.pack_tree_mask`)."""
    t = torch.arange(T, device=mask.device)
    words = mask[:, :, t // 32]  # [B, T, T]: the word holding column t
    return ((words >> (t % 32).to(torch.int32)) & 1).bool()


def visible_keys(kv_start: torch.Tensor, kv_len: torch.Tensor, seg_start: int,
                 mask: torch.Tensor, S: int, window: int = 0) -> torch.Tensor:
    """bool ``[B, T, S]``: which key rows each query may attend to. With ``window`` > 0 a
    query at tree depth d (position ``kv_len - kv_start + d``) sees only the keys less than
    ``window`` positions behind it (prefix row n sits at position ``n - kv_start``)."""
    B, T, _ = mask.shape
    n = torch.arange(S, device=mask.device)
    prefix = (n >= kv_start[:, None]) & (n < kv_len[:, None]) & (n < seg_start)  # [B, S]
    allowed = prefix[:, None, :].expand(B, T, S).clone()
    tree = unpack_tree_mask(mask, T)
    if window > 0:
        depth = tree.sum(-1) - 1  # [B, T]: ancestors in each node's mask row
        behind = kv_len[:, None, None] + depth[:, :, None] - n  # [B, T, S], query minus key
        allowed &= behind < window
        tree = tree & (depth[:, :, None] - depth[:, None, :] < window)
    allowed[:, :, seg_start:seg_start + T] = tree
    return allowed


def tree_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             kv_start: torch.Tensor, kv_len: torch.Tensor, seg_start: int,
                             mask: torch.Tensor, scale: float, window: int = 0,
                             softcap: float = 0.0) -> torch.Tensor:
    """Plain-torch :func:`tree_attention`: a dense boolean mask, then matmul, soft-cap (when
    ``softcap`` > 0) and softmax in fp32 (a query that sees no key gets zeros)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qf = q.float().reshape(B, Hkv, G, T, D)
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]  # [B, Hkv, 1, S, D]
    scores = (qf @ kf.transpose(-1, -2)) * scale  # [B, Hkv, G, T, S]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = visible_keys(kv_start, kv_len, seg_start, mask, S, window)[:, None, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - torch.where(top == float("-inf"), 0.0, top))
    total = weights.sum(-1, keepdim=True)
    out = (weights @ vf) / torch.where(total == 0, 1.0, total)  # [B, Hkv, G, T, D]
    return out.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, D).to(q.dtype).contiguous()


def _tree_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           kv_start: torch.Tensor, kv_len: torch.Tensor, seg_start: int,
                           mask: torch.Tensor, scale: float, window: int = 0,
                           softcap: float = 0.0) -> torch.Tensor:
    # Imported on first use: triton is optional, and importing it costs time.
    from fastdecode.triton_kernels.tree.attention import tree_attention_triton

    return tree_attention_triton(q, k, v, kv_start, kv_len, seg_start, mask, scale, window,
                                 softcap)


register("tree_attention", "torch")(tree_attention_reference)
register("tree_attention", "triton")(_tree_attention_triton)


# ---- torch.library registration (opaque to torch.compile, with a fake implementation) -------


@torch.library.custom_op("fastdecode::tree_attention", mutates_args=())
def _tree_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       kv_start: torch.Tensor, kv_len: torch.Tensor, seg_start: int,
                       mask: torch.Tensor, scale: float, window: int,
                       softcap: float) -> torch.Tensor:
    return run("tree_attention", q.device, q, k, v, kv_start, kv_len, seg_start, mask, scale,
               window, softcap)


@_tree_attention_op.register_fake
def _(q, k, v, kv_start, kv_len, seg_start, mask, scale, window, softcap):
    B, Hq, T, D = q.shape
    return q.new_empty(B, T, Hq, D)


# ---- public, validated entry point ----------------------------------------------------------


def _check_values(kv_start: torch.Tensor, kv_len: torch.Tensor, seg_start: int) -> None:
    """``0 <= kv_start <= kv_len <= seg_start`` for every row (one host sync)."""
    bad = torch.stack([(kv_start < 0).any(), (kv_len < kv_start).any(),
                       (kv_len > seg_start).any()]).tolist()
    problems = [
        f"kv_start must be >= 0, found {kv_start.tolist()}",
        f"kv_len must be >= kv_start in every row, found kv_start={kv_start.tolist()}, "
        f"kv_len={kv_len.tolist()}",
        f"kv_len must be <= seg_start={seg_start} (the prefix ends where the tree's keys "
        f"begin), found {kv_len.tolist()}",
    ]
    for found, problem in zip(bad, problems):
        if found:
            raise ValueError(problem)


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor,
                   kv_len: torch.Tensor, seg_start: int, mask: torch.Tensor, *,
                   scale: float | None = None, window: int | None = None,
                   softcap: float | None = None, validate: bool = True) -> torch.Tensor:
    """Attention of a draft tree's T tokens over their cached prefix and the tree itself.

    Query i of row b attends to the prefix keys ``[kv_start[b], kv_len[b])`` and to the
    tree's keys ``seg_start + t`` for which bit ``(i, t)`` of ``mask`` is set. A query that
    sees no key gets zeros. Accumulation is in fp32.

    Positions: row b's prefix key at cache row n sits at position ``n - kv_start[b]``, and a
    tree token at depth d (its ancestors in ``mask``, the root at depth 0) at ``kv_len[b] -
    kv_start[b] + d`` (the positions :func:`fastdecode.ops.tree_positions` gives the model).

    Args:
        q: ``[B, Hq, T, D]`` fp16, bf16 or fp32, the tree tokens' queries; any strides (a
            view whose last stride is not 1 is copied first).
        k, v: ``[B, Hkv, S, D]``, q's dtype, ``stride(-1) == 1``: the KV cache, already
            holding the tree tokens' keys and values at rows ``seg_start .. seg_start+T-1``.
            ``Hq % Hkv == 0`` (grouped-query and multi-query attention); D is a multiple of
            16 up to 256.
        kv_start, kv_len: int64 ``[B]``: row b's prefix is key rows ``[kv_start[b],
            kv_len[b])`` (``kv_start`` skips left padding), ``0 <= kv_start <= kv_len <=
            seg_start``.
        seg_start: the cache row of the tree's first token, ``seg_start + T <= S``.
        mask: int32 ``[B, T, ceil(T/32)]``, the packed tree mask from
            :func:`fastdecode.ops.pack_tree_mask`: bit ``t % 32`` (LSB first) of word
            ``t // 32`` of row i lets query i see the tree's token t. 1 <= T <= MAX_TREE_NODES.
        scale: the softmax scale, default ``1 / sqrt(D)``.
        window: a sliding window of ``window >= 1`` positions: a query sees only the keys
            less than ``window`` positions behind it (transformers' ``sliding_window``; Mistral,
            Gemma2/3 local layers). The prefix rows before the window are skipped. None: no
            window.
        softcap: soft-capping of the scaled logits, ``x -> softcap * tanh(x / softcap)``
            before the softmax (Gemma2's ``attn_logit_softcapping``), ``softcap > 0``. None:
            no cap.
        validate: check the values of ``kv_start`` and ``kv_len`` (one host sync). Unchecked,
            the prefix is clamped into ``[0, seg_start)`` and nothing is read out of bounds.

    All tensors share one device.

    Returns:
        ``[B, T, Hq, D]`` contiguous, q's dtype (the layout transformers' attention functions
        return).
    """
    _validate.tensor("q", q, None, 4, "[B, Hq, T, D]")
    if q.dtype not in DTYPES:
        raise TypeError(f"q must have dtype float16, bfloat16 or float32, found {q.dtype}")
    B, Hq, T, D = q.shape
    for name, x in (("k", k), ("v", v)):
        _validate.tensor(name, x, q.dtype, 4, "[B, Hkv, S, D]")
    Hkv, S = k.shape[1], k.shape[2]
    _validate.shape("k", k, (B, Hkv, S, D), "[B, Hkv, S, D]")
    _validate.shape("v", v, (B, Hkv, S, D), "[B, Hkv, S, D]")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q's heads Hq={Hq} must be a multiple of k's heads Hkv={Hkv} "
                         f"(q {tuple(q.shape)}, k {tuple(k.shape)})")
    if D % 16 or not 16 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"the head dim D must be a multiple of 16 in [16, {MAX_HEAD_DIM}], "
                         f"found q shape {tuple(q.shape)}")
    if not 1 <= T <= MAX_TREE_NODES:
        raise ValueError(f"q must have T in [1, {MAX_TREE_NODES}] tokens, found shape "
                         f"{tuple(q.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have stride 1 on its last dim D, found strides "
                             f"{x.stride()}")
    _validate.tensor("kv_start", kv_start, torch.int64, 1, "[B]")
    _validate.tensor("kv_len", kv_len, torch.int64, 1, "[B]")
    _validate.shape("kv_start", kv_start, (B,), "[B]")
    _validate.shape("kv_len", kv_len, (B,), "[B]")
    words = (T + 31) // 32
    _validate.tensor("mask", mask, torch.int32, 3, "[B, T, ceil(T/32)]")
    _validate.shape("mask", mask, (B, T, words), "[B, T, ceil(T/32)]")
    _validate.integer("seg_start", seg_start, 0, S - T)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, found {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite, found {scale}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"window must be an int or None, found {type(window).__name__}")
        if window < 1:
            raise ValueError(f"window must be >= 1 (positions a query sees), found {window}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be a float or None, found {type(softcap).__name__}")
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be a finite float > 0, found {softcap}")
    _validate.same_device([("q", q), ("k", k), ("v", v), ("kv_start", kv_start),
                           ("kv_len", kv_len), ("mask", mask)])
    kv_start, kv_len, mask = kv_start.contiguous(), kv_len.contiguous(), mask.contiguous()
    if validate and B:
        _check_values(kv_start, kv_len, seg_start)
    if q.stride(-1) != 1:
        q = q.contiguous()
    return dispatch("tree_attention", _tree_attention_op, q.device, q, k, v, kv_start, kv_len,
                    seg_start, mask, float(scale), window if window and window < S else 0,
                    float(softcap or 0.0))  # a window of S or more positions hides nothing
