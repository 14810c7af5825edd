"""``attn_implementation="fastdecode"`` for transformers models.

Tree steps (the model receives ``fastdecode_tree``, see :class:`fastdecode.hf.model.TreeStep`)
run fastdecode's tree attention over the row's cached prefix plus the step's tokens, reading
the packed tree mask. Every other call (the prompt's prefill) runs transformers' SDPA path
with the mask transformers built for it.
"""

from __future__ import annotations

import torch

NAME = "fastdecode"
_registered = False


def fastdecode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: torch.Tensor | None,
                         scaling: float | None = None, dropout: float = 0.0,
                         fastdecode_tree=None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query ``[B, Hq, T, D]``, key and value
    ``[B, Hkv, S+T, D]`` (cache included); returns ``([B, T, Hq, D], None)``."""
    if fastdecode_tree is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    from fastdecode.ops import tree_attention

    t = fastdecode_tree
    out = tree_attention(query, key, value, t.kv_start, t.kv_len, t.seg_start, t.packed_mask,
                         scale=scaling, validate=False)  # the runner keeps the ranges valid
    return out, None


def register() -> None:
    """Registers ``"fastdecode"`` with transformers' AttentionInterface (and the SDPA mask
    builder for its prefill calls). Idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, fastdecode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    _registered = True
