"""Modules built on :mod:`fastdecode.ops` (no transformers import): CASTLE attention, and the
structured linear layers and FFNs with self-guided training."""

from fastdecode.nn.castle import CastleAttention
from fastdecode.nn.ffn import StructuredFFN
from fastdecode.nn.self_guided import SelfGuided, guide_alpha, self_guide, step_self_guided
from fastdecode.nn.structured_linear import (
    BlockDenseLinear,
    BlockShuffleLinear,
    LowRankLinear,
    StructuredLinear,
)

__all__ = [
    "BlockDenseLinear",
    "BlockShuffleLinear",
    "CastleAttention",
    "LowRankLinear",
    "SelfGuided",
    "StructuredFFN",
    "StructuredLinear",
    "guide_alpha",
    "self_guide",
    "step_self_guided",
]
