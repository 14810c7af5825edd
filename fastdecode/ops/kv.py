"""KV-cache compaction after a tree step: the accepted path's keys and values move, in place,
to the contiguous rows right after the prefix; the caller then crops the rest.

This file holds the op's plain-torch reference (the ``torch`` backend), its C++/CUDA
launcher, its ``torch.library`` registration and its public, validated entry point.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastdecode import _native
from fastdecode._backend import dispatch, register, run
from fastdecode.ops import _validate


def compact_kv_reference(caches: list[torch.Tensor], start: torch.Tensor, src: torch.Tensor,
                         count: torch.Tensor) -> None:
    """Plain-torch :func:`compact_kv`: gathers every row through an index map, so reads finish
    before writes. Source rows outside the cache are skipped, as in the kernels."""
    if not caches:
        return
    B, N = src.shape
    for t in caches:
        S = t.shape[2]
        s = torch.arange(S, device=t.device)
        rel = s - start[:, None]  # [B, S]: destination offset i of row s
        moved = (rel >= 0) & (rel < count[:, None])
        if N:
            source = start[:, None] + src.gather(1, rel.clamp(0, N - 1))
            moved &= (source >= 0) & (source < S)
        index = torch.where(moved, source, s) if N else s.expand(B, S)
        t.copy_(t.gather(2, index[:, None, :, None].expand_as(t)))


def _compact_native(caches: list[torch.Tensor], start: torch.Tensor, src: torch.Tensor,
                    count: torch.Tensor) -> None:
    if not caches:
        return
    _native.launch(
        _native._C.compact_kv,
        start,
        [t.data_ptr() for t in caches],
        [d for t in caches for d in t.shape[1:]],
        [st for t in caches for st in t.stride()],
        caches[0].element_size(),
        src.shape[0],
        start.data_ptr(),
        src.data_ptr(),
        src.shape[1],
        count.data_ptr(),
    )


register("compact_kv", "torch")(compact_kv_reference)
register("compact_kv", "cpu")(_compact_native)
register("compact_kv", "cuda")(_compact_native)


@torch.library.custom_op("fastdecode::compact_kv", mutates_args=("caches",))
def _compact_kv_op(caches: list[torch.Tensor], start: torch.Tensor, src: torch.Tensor,
                   count: torch.Tensor) -> None:
    run("compact_kv", start.device, caches, start, src, count)


@_compact_kv_op.register_fake
def _(caches, start, src, count):
    return None


def cache_tensors(caches: object) -> list[torch.Tensor]:
    """The K and V tensors of ``caches``: a sequence of tensors, or a transformers
    ``DynamicCache``-like object whose ``layers`` each hold ``keys`` and ``values``."""
    layers = getattr(caches, "layers", None)
    if layers is not None:
        out = []
        for i, layer in enumerate(layers):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
                raise ValueError(f"caches.layers[{i}] holds no keys/values tensors yet")
            out += [keys, values]
        return out
    if isinstance(caches, torch.Tensor) or not isinstance(caches, Sequence):
        raise TypeError(
            "caches must be a sequence of [B, H, S, D] tensors or a DynamicCache, "
            f"found {type(caches).__name__}"
        )
    return list(caches)


def compact_kv(caches: Sequence[torch.Tensor] | object, start: torch.Tensor, src: torch.Tensor,
               count: torch.Tensor, *, validate: bool = True) -> None:
    """Moves accepted rows of every cache tensor into place, in place.

    For every row b and ``i < count[b]``, sequence row ``start[b] + src[b, i]`` moves to
    ``start[b] + i`` in every tensor (on CUDA: one launch for up to 256 tensors, i.e. all layers
    of a 128-layer model). Other rows are untouched. Overlapping sources and destinations are
    handled: ``src`` is increasing, so every source row is read before it can be overwritten.

    Args:
        caches: a sequence of tensors ``[B, H, S, D]`` (one K and one V per layer; any strides,
            one dtype of 1, 2, 4 or 8 bytes), or a transformers ``DynamicCache``.
        start: int64 ``[B]``, the first destination row per batch row (e.g. the prefix length).
        src: int64 ``[B, N]``; ``src[b, :count[b]]`` is strictly increasing and >= 0, offsets
            from ``start[b]`` (e.g. the accepted path's node indices); entries past
            ``count[b]`` are ignored.
        count: int64 ``[B]``, rows to move per batch row, in ``[0, N]``.
        validate: check the index values (one host sync) and that no two cache tensors share
            memory. Unchecked, out-of-range rows are skipped, never read or written out of
            bounds.

    All tensors share one device. Returns None.
    """
    tensors = cache_tensors(caches)
    _validate.tensor("start", start, torch.int64, 1, "[B]")
    _validate.tensor("src", src, torch.int64, 2, "[B, N]")
    _validate.tensor("count", count, torch.int64, 1, "[B]")
    B = start.shape[0]
    _validate.shape("src", src, (B, src.shape[1]), "[B, N]")
    _validate.shape("count", count, (B,), "[B]")
    named = [("start", start), ("src", src), ("count", count)]
    for i, t in enumerate(tensors):
        name = f"caches[{i}]"
        _validate.tensor(name, t, tensors[0].dtype, 4, "[B, H, S, D]")
        if t.shape[0] != B:
            raise ValueError(f"{name} must have batch size B = {B} (from start), found shape "
                             f"{tuple(t.shape)}")
        if t.element_size() not in (1, 2, 4, 8):
            raise TypeError(f"{name} has dtype {t.dtype}; compact_kv moves 1, 2, 4 or 8-byte "
                            "elements")
        named.append((name, t))
    _validate.same_device(named)
    src, start, count = src.contiguous(), start.contiguous(), count.contiguous()
    if validate:
        _check_no_aliasing(tensors)
    if validate and B:
        _check_values(start, src, count, min((t.shape[2] for t in tensors), default=None))
    dispatch("compact_kv", _compact_kv_op, start.device, tensors, start, src, count)


def _check_no_aliasing(tensors: list[torch.Tensor]) -> None:
    """In-place moves in parallel need every cache tensor to own its bytes: no tensor twice, no
    two tensors over the same memory, no tensor overlapping itself (e.g. an expanded one)."""
    spans = []
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        overlap = torch._debug_has_internal_overlap(t)  # 0 no, 1 yes, 2 not decidable cheaply
        if overlap == 1 or (overlap == 2 and any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride()))):
            raise ValueError(f"caches[{i}] overlaps itself (e.g. an expanded tensor); pass a "
                             "tensor that owns its memory")
        extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
        spans.append((t.data_ptr(), t.data_ptr() + extent * t.element_size(), i))
    spans.sort()
    for (_, end, i), (begin, _, j) in zip(spans, spans[1:]):
        if begin < end:
            raise ValueError(f"caches[{min(i, j)}] and caches[{max(i, j)}] share memory; each "
                             "cache tensor must be passed once and own its memory")


def _check_values(start: torch.Tensor, src: torch.Tensor, count: torch.Tensor,
                  seq: int | None) -> None:
    """Index rules of :func:`compact_kv`, checked with one host sync."""
    N = src.shape[1]
    live = torch.arange(N, device=src.device) < count[:, None]
    steps = live[:, 1:] & (src[:, 1:] <= src[:, :-1])
    last = start + src.gather(1, (count - 1).clamp(0, max(N - 1, 0))[:, None])[:, 0] if N else start
    past = (count > 0) & (last >= seq) if seq is not None else torch.zeros_like(live[:, 0])
    facts = torch.stack([((count < 0) | (count > N)).any(), (start < 0).any(),
                         (live & (src < 0)).any(), steps.any(), past.any()]).tolist()
    problems = [
        f"count must be in [0, N={N}], found {count.tolist()}",
        f"start must be >= 0, found {start.tolist()}",
        "src[b, :count[b]] must be >= 0",
        "src[b, :count[b]] must be strictly increasing",
        f"start[b] + src[b, count[b]-1] must be < the cache length S={seq} (index past the "
        "cache's end)",
    ]
    for found, problem in zip(facts, problems):
        if found:
            raise ValueError(f"compact_kv: {problem}")
