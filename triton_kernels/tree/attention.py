"""Tree attention: the T tokens of a draft tree attend to their row's cached prefix and, through
the packed tree mask, to each other. The op, its contract and its plain-torch reference live in
:mod:`fastdecode.ops.attention`; this file holds the kernels and their launcher.

Layout. ``q`` is ``[B, Hq, T, D]``, ``k`` and ``v`` are ``[B, Hkv, S, D]`` (any strides, unit
stride on D); the tree's own keys are cache rows ``seg_start .. seg_start + T - 1``. The output
is ``[B, T, Hq, D]``, contiguous.

Work split. One program owns one (batch row, kv head) and a block of BLOCK_M query rows, where
the rows of a kv head are its G = Hq / Hkv query heads for every tree token, ordered
``r = i * G + g`` (token i, head g of the group): each K/V tile loaded serves all G heads.
A program runs a flash-attention style online softmax (base-2 exponentials, fp32 state) first
over its prefix keys ``[kv_start, kv_len)``, where only the range masks, then over the T
segment keys, where bit ``t % 32`` of word ``t // 32`` of the query's mask row decides.

Sliding window and soft-capping (both optional, compile-time switches). A query at tree depth d
sits at position ``kv_len - kv_start + d`` and a prefix key at cache row n at ``n - kv_start``;
with a window W a query sees only keys less than W positions behind it, so the prefix loop
starts at row ``kv_len + d_min - W + 1`` (d_min: the shallowest query of the block), skipping
the rows before it, and masks the deeper queries' extra rows; tree keys are cut by depth
difference. A node's depth is the number of ancestors in its mask row. Soft-capping replaces a
score x by ``softcap * tanh(x / softcap)`` before the softmax.

Split-KV. When the grid is far smaller than the GPU (few rows, heads and tokens) and the cache
is long, the prefix is cut into ``num_splits`` slices, one per program along grid axis 2; the
last slice also takes the segment. Each program then writes its unnormalised partial state
(running max ``m``, sum ``l``, accumulator) in fp32, and a second kernel merges the slices of
every output row.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MIN_SPLIT_KEYS = 256
"""Split-KV cuts the (at most ``seg_start``) prefix keys into slices of at least this many."""
MAX_SPLITS = 32
"""Most prefix slices: bounds the merge kernel's [splits, BLOCK_D] tile."""


@triton.jit
def _operand(x, DOT_FP32: tl.constexpr):
    """``x`` as a ``tl.dot`` operand: converted to fp32 with DOT_FP32 (set for bf16 under the
    interpreter, whose dot multiplies bf16 tiles' raw bits), else unchanged."""
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _scores(q, kt, qk_scale, softcap, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32 scores in base-2 units. ``qk_scale`` is the softmax scale and
    ``softcap`` the cap, both times log2(e); with SOFTCAP the score x becomes
    ``softcap * tanh(x / softcap)`` (the same in base-2 units), its tanh from one exp2."""
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    if SOFTCAP:
        x = s / softcap
        e = tl.exp2(-2.0 * 1.4426950408889634 * tl.abs(x))  # exp(-2|x|)
        t = (1.0 - e) / (1.0 + e)
        s = softcap * tl.where(x < 0, -t, t)
    return s


@triton.jit
def _depths(rows_ptr, ok, words, BLOCK: tl.constexpr):
    """[BLOCK] int32 tree depths of the nodes whose packed mask rows start at ``rows_ptr``
    ([BLOCK] pointers): the bits set in the row (ancestors and the node itself), minus one.
    Rows that are not ``ok`` get -1."""
    offs_w = tl.arange(0, 32)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for w in range(0, words):
        word = tl.load(rows_ptr + w, mask=ok, other=0)
        count += tl.sum((word[:, None] >> offs_w[None, :]) & 1, 1)
    return count - 1


@triton.jit
def _online_softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION: tl.constexpr):
    """Folds one key block into the running state of BLOCK_M query rows.

    ``s``: [BLOCK_M, BLOCK_N] fp32 scores in base-2 units, -inf where a key is hidden; ``v``:
    [BLOCK_N, BLOCK_D] values. ``m_i`` / ``l_i``: [BLOCK_M] running max and sum; ``acc``:
    [BLOCK_M, BLOCK_D] fp32 running sum of weighted values. A row that has seen no visible key
    keeps ``m = -inf``, ``l = 0`` and ``acc = 0``.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # keeps -inf - -inf out of exp2
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["seg_start"])  # it moves every decoding step: no recompiles
def _tree_attention_kernel(
    Q, K, V, KV_START, KV_LEN, MASK, OUT, M_PART, L_PART,
    B, T, Hq, G, D, seg_start, words, num_splits, qk_scale, window, softcap,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Grid ``(cdiv(T * G, BLOCK_M), B * Hkv, num_splits)``.

    ``qk_scale`` and ``softcap`` are in base-2 units (times log2(e)); ``window`` is read with
    WINDOW and ``softcap`` with SOFTCAP.

    Without SPLIT, writes ``OUT[b, i, h, :]`` (dtype of q). With SPLIT, ``OUT`` is fp32
    ``[num_splits, B, T, Hq, D]`` and gets the unnormalised accumulator, ``M_PART`` and
    ``L_PART`` (fp32 ``[num_splits, B, T, Hq]``) the running max (base 2) and sum.
    """
    block = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    Hkv = Hq // G
    b = (bh // Hkv).to(tl.int64)
    kvh = (bh % Hkv).to(tl.int64)

    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T * G
    tok = rows // G
    head = kvh * G + rows % G
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q_ptrs = (Q + b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qt
              + offs_d[None, :])
    q = _operand(tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0), DOT_FP32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Prefix keys [kv_start, kv_len), clamped into [0, seg_start) so that unchecked values
    # never read outside the cache (and, with a window, cut to the rows the shallowest query
    # of the block can see); this program's slice of them under split-KV.
    first = tl.maximum(tl.load(KV_START + b).to(tl.int32), 0)
    end = tl.minimum(tl.load(KV_LEN + b).to(tl.int32), seg_start)
    mask_rows = MASK + b * T * words + tok * words
    if WINDOW:
        depth = _depths(mask_rows, row_ok, words, BLOCK_M)
        shallowest = tl.min(tl.where(row_ok, depth, T), 0)
        first = tl.maximum(first, end + shallowest - window + 1)
        oldest = end + depth - window + 1  # [BLOCK_M]: each query's first visible prefix row
    chunk = tl.cdiv(tl.cdiv(tl.maximum(end - first, 0), num_splits), BLOCK_N) * BLOCK_N
    lo = first + split * chunk
    hi = tl.minimum(lo + chunk, end)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        n_ok = n < hi
        kt = _operand(tl.load(k_base + n[None, :] * stride_ks + offs_d[:, None],
                              mask=n_ok[None, :] & d_ok[:, None], other=0.0), DOT_FP32)
        s = _scores(q, kt, qk_scale, softcap, SOFTCAP, DOT_PRECISION)
        seen = n_ok[None, :]
        if WINDOW:
            seen = seen & (n[None, :] >= oldest[:, None])
        s = tl.where(seen, s, float("-inf"))
        v = _operand(tl.load(v_base + n[:, None] * stride_vs + offs_d[None, :],
                             mask=n_ok[:, None] & d_ok[None, :], other=0.0), DOT_FP32)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION)

    # Segment keys seg_start + t, 32 at a time: one mask word per query row, whose bit t % 32
    # says whether the query sees key t (bits past T are ignored).
    offs_w = tl.arange(0, 32)
    seg_end = tl.where(split == num_splits - 1, T, 0)
    for t0 in range(0, seg_end, 32):
        t = t0 + offs_w
        t_ok = t < T
        n = seg_start + t
        kt = _operand(tl.load(k_base + n[None, :] * stride_ks + offs_d[:, None],
                              mask=t_ok[None, :] & d_ok[:, None], other=0.0), DOT_FP32)
        s = _scores(q, kt, qk_scale, softcap, SOFTCAP, DOT_PRECISION)
        word = tl.load(mask_rows + t0 // 32, mask=row_ok, other=0)
        visible = (((word[:, None] >> offs_w[None, :]) & 1) != 0) & t_ok[None, :]
        if WINDOW:
            key_depth = _depths(MASK + b * T * words + t * words, t_ok, words, 32)
            visible = visible & (depth[:, None] - key_depth[None, :] < window)
        s = tl.where(visible, s, float("-inf"))
        v = _operand(tl.load(v_base + n[:, None] * stride_vs + offs_d[None, :],
                             mask=t_ok[:, None] & d_ok[None, :], other=0.0), DOT_FP32)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION)

    out_rows = ((split * B + b) * T + tok) * Hq + head  # [num_splits, B, T, Hq] row index
    out_ptrs = OUT + out_rows[:, None] * D + offs_d[None, :]
    out_mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        tl.store(out_ptrs, acc, mask=out_mask)
        tl.store(M_PART + out_rows, m_i, mask=row_ok)
        tl.store(L_PART + out_rows, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no visible key: zeros
        tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_splits_kernel(ACC, M_PART, L_PART, OUT, rows, D, num_splits,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(rows,)`` with ``rows = B * T * Hq``: combines the ``num_splits`` partial states
    of one output row into ``OUT[row, :]`` (see :func:`_tree_attention_kernel`)."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < D
    part = offs_s.to(tl.int64) * rows + row
    m = tl.load(M_PART + part, mask=s_ok, other=float("-inf"))
    l = tl.load(L_PART + part, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    total = tl.sum(l * w, 0)
    acc = tl.load(ACC + part[:, None] * D + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                  other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(OUT + row * D + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _config(D: int, rows: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages)`` for head dim D, ``rows = T * G``
    query rows per kv head, and the inputs' dtype. Chosen so that sm_90 builds of the fp16 and
    bf16 kernels do not spill registers and none exceeds shared memory; fp32 runs its dots as
    three tf32 products (tf32x3), which takes about three times the registers, so it gets the
    smallest tiles (and spills a little at D > 128)."""
    block_d = max(16, triton.next_power_of_2(D))
    if dtype == torch.float32:
        return 16, 32, block_d, 8 if block_d > 128 else 4, 2
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    block_n = 32 if block_d > 128 else 64
    num_warps = 8 if block_m * block_d >= 64 * 128 else 4
    num_stages = 2 if block_m == 64 and block_d > 128 else 3
    return block_m, block_n, block_d, num_warps, num_stages


def choose_splits(programs: int, seg_start: int, device: torch.device) -> int:
    """How many prefix slices to use: 1 unless the grid of ``programs`` fills less than one
    wave of the GPU's multiprocessors; then enough for about two waves, as long as each slice
    can get ``MIN_SPLIT_KEYS`` of the up to ``seg_start`` prefix keys (the prefix lengths
    themselves stay on the device; reading them would cost a host sync)."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    return max(1, min(2 * sms // programs, seg_start // MIN_SPLIT_KEYS, MAX_SPLITS))


def tree_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          kv_start: torch.Tensor, kv_len: torch.Tensor, seg_start: int,
                          mask: torch.Tensor, scale: float, window: int = 0,
                          softcap: float = 0.0, num_splits: int | None = None) -> torch.Tensor:
    """Launches the tree attention kernels on already validated arguments.

    Args:
        q: ``[B, Hq, T, D]`` fp16/bf16/fp32, ``q.stride(-1) == 1``.
        k, v: ``[B, Hkv, S, D]``, q's dtype, unit stride on D.
        kv_start, kv_len: int64 ``[B]``, contiguous: the prefix key rows of each row.
        seg_start: the cache row of the tree's first token.
        mask: int32 ``[B, T, ceil(T/32)]``, contiguous: the packed tree mask.
        scale: the softmax scale.
        window: the sliding window in positions (a query sees keys less than ``window``
            positions behind it), 0 for none.
        softcap: the logit soft-cap, 0 for none.
        num_splits: prefix slices (split-KV); default :func:`choose_splits`' choice.

    Returns:
        ``[B, T, Hq, D]`` contiguous, q's dtype.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_m, block_n, block_d, num_warps, num_stages = _config(D, T * G, q.dtype)
    row_blocks = triton.cdiv(T * G, block_m)
    if num_splits is None:
        num_splits = choose_splits(row_blocks * B * Hkv, seg_start, q.device)
    split = num_splits > 1
    if split:
        acc = torch.empty(num_splits, B, T, Hq, D, dtype=torch.float32, device=q.device)
        m_part = torch.empty(num_splits, B, T, Hq, dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
    else:
        acc, m_part, l_part = out, out, out  # the partial-state pointers go unused
    precision = "tf32x3" if q.dtype == torch.float32 else "tf32"  # only fp32 dots read it
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _tree_attention_kernel[(row_blocks, B * Hkv, num_splits)](
            q, k, v, kv_start, kv_len, mask, acc, m_part, l_part,
            B, T, Hq, G, D, seg_start, mask.shape[2], num_splits, scale * LOG2E, window,
            softcap * LOG2E,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SPLIT=split,
            DOT_PRECISION=precision, DOT_FP32=not q.is_cuda and q.dtype == torch.bfloat16,
            WINDOW=window > 0, SOFTCAP=softcap > 0,
            num_warps=num_warps, num_stages=num_stages,
        )
        if split:
            _merge_splits_kernel[(B * T * Hq,)](
                acc, m_part, l_part, out, B * T * Hq, D, num_splits,
                BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
                num_warps=4 if block_d > 64 else 2,
            )
    return out

