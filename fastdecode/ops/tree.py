"""Draft-tree primitives shared by every lossless draft-and-verify strategy: verification of a
tree of draft tokens, the tree's attention mask (plain and bit-packed) and its position ids.

A draft tree is given per batch row by ``parents`` (int64 ``[B, T]``):
  * node 0 is the root, the last accepted token, and ``parents[b, 0] == -1``;
  * a real node ``j >= 1`` has ``0 <= parents[b, j] < j`` (a parent precedes its child);
  * ``parents[b, j] == -2`` pads the row: node ``j`` is "no node" (a padding node may not be
    the parent of a real node).
With ``validate=False`` these rules are not checked (no host sync); the kernels then treat any
node that breaks them, and its descendants, as padding, and never read out of bounds.

This file holds each op's plain-torch reference (the ``torch`` backend), its C++/CUDA
launchers, its ``torch.library`` registration and its public, validated entry point.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastdecode import _native
from fastdecode._backend import dispatch, register, run
from fastdecode.ops import _validate

MAX_TREE_NODES = 2048
"""Largest T every backend accepts (the CUDA kernels keep a row's tree in shared memory)."""


class VerifyResult(NamedTuple):
    """Result of :func:`verify_tree`; every field is an int64 tensor on the inputs' device.

    accept_len: ``[B]`` depth of the deepest accepted node (0: only the root).
    best_node:  ``[B]`` index of that node; the lowest index among equally deep ones.
    path:       ``[B, D+1]`` node indices from the root to ``best_node``, then -1.
    tokens:     ``[B, D+1]`` the accepted draft tokens (root excluded), then the bonus token
                ``predicted[b, best_node]``, then -1: row b gains ``accept_len + 1`` tokens.
    """

    accept_len: torch.Tensor
    best_node: torch.Tensor
    path: torch.Tensor
    tokens: torch.Tensor


# ---- plain-torch references (the ``torch`` backend) ---------------------------------------


def _links(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each node's parent, with the root and rule-breaking nodes pointing at themselves, and
    whether each node's own parent entry obeys the rules (the root does)."""
    T = parents.shape[1]
    j = torch.arange(T, device=parents.device)
    ok = (parents >= 0) & (parents < j)
    link = torch.where(ok, parents, j)
    ok[:, 0] = True
    return link, ok


def _walk_up(link: torch.Tensor, depth: torch.Tensor, flag: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointer jumping: sums ``depth`` and ANDs ``flag`` over every node's ancestors-or-self.

    ``link`` points at the parent (self at the root and at dead ends, where depth must be 0);
    after ceil(log2 T) rounds every node's link has jumped past any chain of length < T.
    """
    for _ in range(math.ceil(math.log2(max(link.shape[1], 1)))):
        depth = depth + depth.gather(1, link)
        flag = flag & flag.gather(1, link)
        link = link.gather(1, link)
    return depth, flag


def tree_depths(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth of every node (root 0) and whether it is a real node (its whole chain of parents
    obeys the rules). Non-nodes get depth 0. Shapes ``[B, T]``: int64 and bool."""
    link, ok = _links(parents)
    depth, real = _walk_up(link, ok.long() * (link != torch.arange(
        parents.shape[1], device=parents.device)), ok)
    return torch.where(real, depth, 0), real


def verify_tree_reference(draft_tokens: torch.Tensor, parents: torch.Tensor,
                          predicted: torch.Tensor, max_depth: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch :func:`verify_tree`; nodes deeper than ``max_depth`` count as non-nodes."""
    B, T = parents.shape
    link, ok = _links(parents)
    depth, real = tree_depths(parents)
    real &= depth <= max_depth
    match = draft_tokens == predicted.gather(1, link)
    match[:, 0] = True
    _, accepted = _walk_up(link, depth.new_zeros(()).expand_as(depth), ok & match)
    accepted &= real
    best = torch.where(accepted, depth, -1).argmax(dim=1)  # first maximum: the lowest index
    accept_len = depth.gather(1, best[:, None])[:, 0]
    path = torch.full((B, max_depth + 1), -1, dtype=torch.int64, device=parents.device)
    cols = torch.arange(max_depth + 1, device=parents.device)
    node = best
    for _ in range(max_depth + 1):  # climb from the best node, writing each node at its depth
        path.scatter_(1, depth.gather(1, node[:, None]), node[:, None])
        node = link.gather(1, node[:, None])[:, 0]
    path = torch.where(cols <= accept_len[:, None], path, -1)
    drafted = draft_tokens.gather(1, path[:, 1:].clamp(min=0))
    bonus = predicted.gather(1, best[:, None])
    tokens = torch.cat([drafted, bonus.new_full((B, 1), -1)], dim=1)
    tokens = torch.where(cols < accept_len[:, None], tokens, -1)
    tokens = tokens.scatter(1, accept_len[:, None], bonus)
    return accept_len, best, path, tokens


def tree_mask_reference(parents: torch.Tensor) -> torch.Tensor:
    """Plain-torch :func:`tree_mask`: climbs every node to the root, one step at a time."""
    B, T = parents.shape
    link, _ = _links(parents)
    _, real = tree_depths(parents)
    node = torch.arange(T, device=parents.device).expand(B, T).contiguous()
    mask = torch.zeros(B, T, T, dtype=torch.bool, device=parents.device)
    for _ in range(T):
        mask.scatter_(2, node[:, :, None], True)
        node = link.gather(1, node)
    eye = torch.eye(T, dtype=torch.bool, device=parents.device)
    return torch.where(real[:, :, None], mask, eye)


def tree_positions_reference(parents: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
    """Plain-torch :func:`tree_positions`."""
    return prefix_len[:, None] + tree_depths(parents)[0]


def pack_tree_mask_reference(mask: torch.Tensor) -> torch.Tensor:
    """Plain-torch :func:`pack_tree_mask`."""
    B, T, _ = mask.shape
    words = (T + 31) // 32
    bits = torch.nn.functional.pad(mask, (0, words * 32 - T)).view(B, T, words, 32).long()
    weights = torch.ones((), dtype=torch.int64, device=mask.device) << torch.arange(
        32, device=mask.device)
    packed = (bits * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


register("verify_tree", "torch")(verify_tree_reference)
register("tree_mask", "torch")(tree_mask_reference)
register("tree_positions", "torch")(tree_positions_reference)
register("pack_tree_mask", "torch")(pack_tree_mask_reference)


# ---- C++ (``cpu``) and CUDA (``cuda``) launchers --------------------------------------------


def _verify_native(draft_tokens: torch.Tensor, parents: torch.Tensor, predicted: torch.Tensor,
                   max_depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T = parents.shape
    accept_len, best = (parents.new_empty(B) for _ in range(2))
    path, tokens = (parents.new_empty(B, max_depth + 1) for _ in range(2))
    _native.launch(_native._C.verify_tree, parents, draft_tokens.data_ptr(), parents.data_ptr(),
                   predicted.data_ptr(), B, T, max_depth, accept_len.data_ptr(), best.data_ptr(),
                   path.data_ptr(), tokens.data_ptr())
    return accept_len, best, path, tokens


def _mask_native(parents: torch.Tensor) -> torch.Tensor:
    B, T = parents.shape
    mask = torch.empty(B, T, T, dtype=torch.bool, device=parents.device)
    _native.launch(_native._C.tree_mask, parents, parents.data_ptr(), B, T, mask.data_ptr())
    return mask


def _positions_native(parents: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
    B, T = parents.shape
    positions = torch.empty_like(parents)
    _native.launch(_native._C.tree_positions, parents, parents.data_ptr(), prefix_len.data_ptr(),
                   B, T, positions.data_ptr())
    return positions


def _pack_native(mask: torch.Tensor) -> torch.Tensor:
    B, T, _ = mask.shape
    packed = torch.empty(B, T, (T + 31) // 32, dtype=torch.int32, device=mask.device)
    _native.launch(_native._C.pack_tree_mask, mask, mask.data_ptr(), B, T, packed.data_ptr())
    return packed


for _backend_name in ("cpu", "cuda"):
    register("verify_tree", _backend_name)(_verify_native)
    register("tree_mask", _backend_name)(_mask_native)
    register("tree_positions", _backend_name)(_positions_native)
    register("pack_tree_mask", _backend_name)(_pack_native)


# ---- torch.library registration (opaque to torch.compile, with fake implementations) -------


@torch.library.custom_op("fastdecode::verify_tree", mutates_args=())
def _verify_tree_op(draft_tokens: torch.Tensor, parents: torch.Tensor, predicted: torch.Tensor,
                    max_depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return run("verify_tree", parents.device, draft_tokens, parents, predicted, max_depth)


@_verify_tree_op.register_fake
def _(draft_tokens, parents, predicted, max_depth):
    B = parents.shape[0]
    return (parents.new_empty(B), parents.new_empty(B), parents.new_empty(B, max_depth + 1),
            parents.new_empty(B, max_depth + 1))


@torch.library.custom_op("fastdecode::tree_mask", mutates_args=())
def _tree_mask_op(parents: torch.Tensor) -> torch.Tensor:
    return run("tree_mask", parents.device, parents)


@_tree_mask_op.register_fake
def _(parents):
    B, T = parents.shape
    return parents.new_empty(B, T, T, dtype=torch.bool)


@torch.library.custom_op("fastdecode::tree_positions", mutates_args=())
def _tree_positions_op(parents: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
    return run("tree_positions", parents.device, parents, prefix_len)


@_tree_positions_op.register_fake
def _(parents, prefix_len):
    return torch.empty_like(parents)


@torch.library.custom_op("fastdecode::pack_tree_mask", mutates_args=())
def _pack_tree_mask_op(mask: torch.Tensor) -> torch.Tensor:
    return run("pack_tree_mask", mask.device, mask)


@_pack_tree_mask_op.register_fake
def _(mask):
    B, T, _ = mask.shape
    return mask.new_empty(B, T, (T + 31) // 32, dtype=torch.int32)


# ---- public, validated entry points ---------------------------------------------------------


def _check_parents(parents: object, name: str = "parents") -> torch.Tensor:
    """dtype, rank and T of ``parents``; returns it contiguous."""
    _validate.tensor(name, parents, torch.int64, 2, "[B, T]")
    if not 1 <= parents.shape[1] <= MAX_TREE_NODES:
        raise ValueError(
            f"{name} must have T in [1, {MAX_TREE_NODES}] nodes (node 0 is the root), "
            f"found shape {tuple(parents.shape)}"
        )
    return parents.contiguous()


def _check_tree_values(parents: torch.Tensor) -> int:
    """Checks the tree rules on the values of ``parents`` (one host sync); returns the depth
    of the deepest node over the batch."""
    B, T = parents.shape
    j = torch.arange(T, device=parents.device)
    p = parents[:, 1:]
    wrong = (p >= j[1:]) | (p < -2) | (p == -1)
    pad = parents == -2
    orphan = ~pad[:, 1:] & pad.gather(1, torch.where(wrong, 0, p.clamp(min=0)))
    depth = tree_depths(parents)[0]
    root_wrong = parents[:, 0] != -1
    deepest = depth.max() if B else depth.new_zeros(())
    facts = torch.stack([root_wrong.any().long(), wrong.any().long(), orphan.any().long(),
                         deepest]).tolist()
    if facts[0]:
        b = int(root_wrong.nonzero()[0, 0])
        raise ValueError(f"parents[{b}, 0] must be -1 (node 0 is the root), found {int(parents[b, 0])}")
    for bad, found, rule in (
        (wrong, facts[1], "must be -2 (padding) or in [0, j) (a parent precedes its child)"),
        (orphan, facts[2], "is a padding node, which cannot be a parent"),
    ):
        if found:
            b, k = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"parents[{b}, {k + 1}] = {int(p[b, k])} {rule}")
    return int(facts[3])


def verify_tree(draft_tokens: torch.Tensor, parents: torch.Tensor, predicted: torch.Tensor, *,
                max_depth: int | None = None, validate: bool = True) -> VerifyResult:
    """Accepts the longest path of a draft tree whose tokens the model itself predicts.

    Args:
        draft_tokens: int64 ``[B, T]``, the token of each node; node 0 is the root, the last
            accepted token.
        parents: int64 ``[B, T]``, the tree (see the module docstring; -2 pads a row).
        predicted: int64 ``[B, T]``, the token the model emits after node j: the argmax for
            greedy decoding, or a token sampled from the model's processed distribution at
            node j for sampling.
        max_depth: D, the width of ``path`` and ``tokens`` is D+1. Default: the deepest node
            of the batch (found with a host sync). It must be at least that depth; with
            ``validate=False`` it is required, and deeper nodes are ignored.
        validate: check the tree rules and ``max_depth`` on the values (one host sync).

    A node ``j >= 1`` is accepted when its parent is and ``draft_tokens[b, j] ==
    predicted[b, parents[b, j]]``. All tensors share one device; outputs are int64 there.

    Why sampling stays exact: ``predicted[j]`` is drawn from the model's distribution given
    the context up to node j, independently of the draft tokens. The emitted tokens are the
    predictions along the accepted path: the first is ``predicted[0]``, drawn given the real
    context; a child is followed only when its token equals that sample, so each next
    emitted token is again a draw given exactly the tokens emitted before it. The emitted
    sequence is therefore distributed as in one-token-at-a-time sampling. This needs sibling
    nodes to carry distinct tokens (a trie does): with two equal siblings, choosing the one
    that goes deeper would depend on the samples and bias the output. Greedy decoding has no
    such condition.

    Returns:
        :class:`VerifyResult` ``(accept_len [B], best_node [B], path [B, D+1], tokens [B, D+1])``.
    """
    parents = _check_parents(parents)
    B, T = parents.shape
    _validate.tensor("draft_tokens", draft_tokens, torch.int64, 2, "[B, T]")
    _validate.tensor("predicted", predicted, torch.int64, 2, "[B, T]")
    _validate.shape("draft_tokens", draft_tokens, (B, T), "[B, T]")
    _validate.shape("predicted", predicted, (B, T), "[B, T]")
    _validate.same_device([("parents", parents), ("draft_tokens", draft_tokens),
                           ("predicted", predicted)])
    if max_depth is not None:
        _validate.integer("max_depth", max_depth, 0, T - 1)
    if validate:
        deepest = _check_tree_values(parents)
        if max_depth is None:
            max_depth = deepest
        elif max_depth < deepest:
            raise ValueError(f"max_depth must be >= the tree's depth {deepest}, found {max_depth}")
    elif max_depth is None:
        raise ValueError("max_depth is required when validate=False (it sizes the outputs)")
    out = dispatch("verify_tree", _verify_tree_op, parents.device, draft_tokens.contiguous(),
                   parents, predicted.contiguous(), max_depth)
    return VerifyResult(*out)


def tree_mask(parents: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """Ancestor-or-self attention mask of a draft tree.

    Args:
        parents: int64 ``[B, T]`` (see the module docstring).
        validate: check the tree rules on the values (one host sync).

    Returns:
        bool ``[B, T, T]`` on ``parents``' device: ``mask[b, i, j]`` is True when node j is
        node i or one of its ancestors. A padding node sees only itself, so that no row of
        attention is empty.
    """
    parents = _check_parents(parents)
    if validate:
        _check_tree_values(parents)
    return dispatch("tree_mask", _tree_mask_op, parents.device, parents)


def tree_positions(parents: torch.Tensor, prefix_len: int | torch.Tensor, *,
                   validate: bool = True) -> torch.Tensor:
    """Position ids of draft-tree nodes: prefix length plus depth.

    Args:
        parents: int64 ``[B, T]`` (see the module docstring).
        prefix_len: an int, or int64 ``[B]`` on ``parents``' device (rows may differ): the
            position of the root is ``prefix_len``.
        validate: check the tree rules and ``prefix_len >= 0`` on the values (one host sync).

    Returns:
        int64 ``[B, T]``: ``prefix_len[b] + depth(j)``; padding nodes get ``prefix_len[b]``.
    """
    parents = _check_parents(parents)
    B = parents.shape[0]
    if isinstance(prefix_len, torch.Tensor):
        _validate.tensor("prefix_len", prefix_len, torch.int64, 1, "[B]")
        _validate.shape("prefix_len", prefix_len, (B,), "[B]")
        _validate.same_device([("parents", parents), ("prefix_len", prefix_len)])
        if validate and B and bool((prefix_len < 0).any()):
            raise ValueError(f"prefix_len must be >= 0, found {prefix_len.tolist()}")
        prefix = prefix_len.contiguous()
    else:
        prefix = torch.full((B,), _validate.integer("prefix_len", prefix_len, 0),
                            dtype=torch.int64, device=parents.device)
    if validate:
        _check_tree_values(parents)
    return dispatch("tree_positions", _tree_positions_op, parents.device, parents, prefix)


def pack_tree_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-packs a boolean attention mask for the attention kernels.

    Args:
        mask: bool ``[B, T, T]``, e.g. from :func:`tree_mask`, with 1 <= T <= MAX_TREE_NODES.

    Returns:
        int32 ``[B, T, ceil(T/32)]``: bit ``k`` (LSB first) of word ``w`` of row ``i`` is
        ``mask[b, i, 32*w + k]``; bits past T are 0. Bit 31 set makes the word negative.
    """
    _validate.tensor("mask", mask, torch.bool, 3, "[B, T, T]")
    B, T, _ = mask.shape
    _validate.shape("mask", mask, (B, T, T), "[B, T, T]")
    if not 1 <= T <= MAX_TREE_NODES:
        raise ValueError(f"mask must have T in [1, {MAX_TREE_NODES}], found shape {tuple(mask.shape)}")
    return dispatch("pack_tree_mask", _pack_tree_mask_op, mask.device, mask.contiguous())
