"""``attn_implementation="fastdecode"`` for transformers models.

Tree steps (the model receives ``fastdecode_tree``, see :class:`fastdecode.hf.model.TreeStep`)
run fastdecode's tree attention over the row's cached prefix plus the step's tokens, reading
the packed tree mask, with the layer's sliding window and logit soft-cap (the ``sliding_window``
and ``softcap`` arguments transformers passes every attention function). Every other call (the
prompt's prefill) runs transformers' SDPA path with the mask transformers built for it, or, for
a soft-capped layer, which SDPA cannot cap, a plain-torch attention over the same mask.
"""

from __future__ import annotations

import torch

NAME = "fastdecode"
_registered = False


def capped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor | None, scale: float, softcap: float) -> torch.Tensor:
    """Soft-capped attention in fp32: query ``[B, Hq, Q, D]``, key and value ``[B, Hkv, K, D]``
    (``Hq % Hkv == 0``), ``mask`` bool (True: attend) or additive float, broadcastable to
    ``[B, Hq, Q, K]``, or None for causal attention whose last query is the last key. Returns
    ``[B, Q, Hq, D]`` in query's dtype."""
    group = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(group, dim=1)
    v = value.float().repeat_interleave(group, dim=1)
    scores = query.float() @ k.transpose(-1, -2) * scale
    scores = softcap * torch.tanh(scores / softcap)
    Q, K = scores.shape[-2:]
    if mask is None:
        mask = torch.ones(Q, K, dtype=torch.bool, device=query.device).tril(K - Q)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.float()
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully masked row: zeros
    return (weights @ v).transpose(1, 2).to(query.dtype).contiguous()


def fastdecode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: torch.Tensor | None,
                         scaling: float | None = None, dropout: float = 0.0,
                         fastdecode_tree=None, sliding_window: int | None = None,
                         softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query ``[B, Hq, T, D]``, key and value
    ``[B, Hkv, S+T, D]`` (cache included); returns ``([B, T, Hq, D], None)``."""
    if fastdecode_tree is None:
        if softcap is not None:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            return capped_attention(query, key, value, attention_mask, scale, softcap), None
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, sliding_window=sliding_window, **kwargs)
    from fastdecode.ops import tree_attention

    t = fastdecode_tree
    out = tree_attention(query, key, value, t.kv_start, t.kv_len, t.seg_start, t.packed_mask,
                         scale=scaling, window=sliding_window, softcap=softcap,
                         validate=False)  # the runner keeps the ranges valid
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
