"""Public ops. Each validates its inputs, then runs through a ``torch.library`` custom op that
dispatches to the fastest available backend (see :mod:`fastdecode._backend`)."""

from fastdecode.ops.attention import tree_attention
from fastdecode.ops.castle import (
    CastleCache,
    castle_attention,
    castle_attention_naive,
    castle_decode,
    castle_prefill,
)
from fastdecode.ops.kv import compact_kv
from fastdecode.ops.linear import small_linear
from fastdecode.ops.structured import (
    block_dense_decode,
    block_shuffle,
    block_shuffle_decode,
    dense_decode,
    lowrank_decode,
    swiglu_up,
)
from fastdecode.ops.tree import (
    MAX_TREE_NODES,
    VerifyResult,
    pack_tree_mask,
    tree_mask,
    tree_positions,
    verify_tree,
)

__all__ = [
    "MAX_TREE_NODES",
    "CastleCache",
    "VerifyResult",
    "block_dense_decode",
    "block_shuffle",
    "block_shuffle_decode",
    "castle_attention",
    "castle_attention_naive",
    "castle_decode",
    "castle_prefill",
    "compact_kv",
    "dense_decode",
    "lowrank_decode",
    "pack_tree_mask",
    "small_linear",
    "swiglu_up",
    "tree_attention",
    "tree_mask",
    "tree_positions",
    "verify_tree",
]
