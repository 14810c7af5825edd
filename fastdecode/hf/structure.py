"""Swapping the feed-forward blocks of a transformers Llama or Qwen2 model for structured ones
(:class:`fastdecode.nn.StructuredFFN`), fitted to the dense weights with ``from_dense``."""

from __future__ import annotations

import torch
from torch import nn

from fastdecode.nn.ffn import StructuredFFN

SUPPORTED = ("llama", "qwen2")
"""``config.model_type`` values whose MLP (gate_proj, up_proj, down_proj, SiLU) is supported."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (``model.model.layers``) or of its base model
    (``model.layers``)."""
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise TypeError(f"{type(model).__name__} has no decoder layers at .model.layers or .layers")


def structure_model(model: nn.Module, kind: str, rank: int | None = None,
                    blocks: int | None = None, *, skip_first: bool = True,
                    gate_up: str = "fused") -> list[int]:
    """Replaces, in place, the MLP of every decoder layer (but layer 0 with ``skip_first``, as
    the paper does) by a :class:`~fastdecode.nn.StructuredFFN` of ``kind`` fitted to it.

    By default the SwiGLU gate and up projections become ONE structured ``d -> 2f`` layer
    (fitted to the stacked ``[gate; up]`` weight; ``gate_up="separate"`` fits two ``d -> f``
    layers instead) and down becomes a structured ``f -> d`` layer, all with ``rank`` /
    ``blocks`` (see :class:`~fastdecode.nn.StructuredFFN`). Weights keep their
    dtype and device; MLP biases (``mlp_bias``) come along. At full rank (LowRank or one-block
    BlockDense with ``rank = min(d, f)``, or BlockShuffle with one block) the model computes
    the same function.

    Args:
        model: a transformers ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (or their base
            models), ``config.hidden_act == "silu"``.
        kind: ``"lowrank"``, ``"blockdense"``, ``"blockshuffle"`` or ``"dense"``.
        rank, blocks: the structure's parameters.
        skip_first: keep layer 0's MLP dense.
        gate_up: ``"fused"`` or ``"separate"`` (see :class:`~fastdecode.nn.StructuredFFN`).

    Returns:
        The indices of the layers that were replaced.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise TypeError(f"model must be a Llama or Qwen2 model (config.model_type in "
                        f"{SUPPORTED}), found {model_type!r}")
    if getattr(config, "hidden_act", None) != "silu":
        raise ValueError(f"config.hidden_act must be 'silu' (SwiGLU), found "
                         f"{getattr(config, 'hidden_act', None)!r}")
    layers = decoder_layers(model)
    # Validates kind, rank and blocks against the widths before any layer changes.
    StructuredFFN(config.hidden_size, config.intermediate_size, kind, rank, blocks,
                  gate_up=gate_up, device="meta")
    replaced = []
    for index, layer in enumerate(layers):
        if skip_first and index == 0:
            continue
        mlp = layer.mlp
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        fc1 = nn.Linear(gate.in_features, 2 * gate.out_features, bias=gate.bias is not None,
                        device="meta")
        fc1.weight = nn.Parameter(torch.cat([gate.weight.detach(), up.weight.detach()]))
        if gate.bias is not None:
            fc1.bias = nn.Parameter(torch.cat([gate.bias.detach(), up.bias.detach()]))
        layer.mlp = StructuredFFN.from_dense(fc1, down, kind, rank, blocks, activation="swiglu",
                                             gate_up=gate_up)
        replaced.append(index)
    return replaced
