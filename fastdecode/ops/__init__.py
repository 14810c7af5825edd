"""Public ops. Each validates its inputs, then runs through a ``torch.library`` custom op that
dispatches to the fastest available backend (see :mod:`fastdecode._backend`).

The test oracles of CASTLE live in :mod:`fastdecode.ops.castle.reference`; reading them from
here still works but warns (:class:`DeprecationWarning`)."""

import importlib
import warnings

from fastdecode.ops.attention import tree_attention
from fastdecode.ops.castle import CastleCache, castle_attention, castle_decode, castle_prefill
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

_MOVED = {
    "castle_attention_naive": "fastdecode.ops.castle.reference",
    "castle_attention_reference": "fastdecode.ops.castle.reference",
}
"""Names no longer exported here, and the module that defines them."""


def __getattr__(name: str) -> object:
    if name in _MOVED:
        warnings.warn(f"fastdecode.ops.{name} is a test oracle, not a public op; import it from "
                      f"{_MOVED[name]}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'fastdecode.ops' has no attribute {name!r}")
