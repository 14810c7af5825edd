"""Choosing each tree node's token from the model's logits: the argmax (greedy), or one
independent draw per node from the processed distribution (temperature, top-k, top-p, min-p)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen. ``do_sample=False`` is greedy; otherwise logits are divided by
    ``temperature``, then restricted to the ``top_k`` most likely tokens, to the smallest set
    whose probability reaches ``top_p`` and to the tokens at least ``min_p`` times as likely as
    the most likely one (as transformers' warpers do, in that order), then sampled."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, found {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, found {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be None or in (0, 1], found {self.top_p!r}")
        if self.min_p is not None and (isinstance(self.min_p, bool)
                                       or not isinstance(self.min_p, (int, float))
                                       or not 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be None or in [0, 1], found {self.min_p!r}")


def processed_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p applied to fp32 ``logits [..., V]``; removed tokens
    get -inf. The top-p rule keeps the most likely tokens up to and including the one whose
    cumulative probability first reaches ``top_p``; min-p keeps the tokens whose probability is
    at least ``min_p`` times the largest (the most likely token always stays)."""
    x = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < x.shape[-1]:
        kth = torch.topk(x, cfg.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_x.softmax(-1)) >= cfg.top_p  # mass before this token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    if cfg.min_p is not None and cfg.min_p > 0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < cfg.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return x


def choose_tokens(logits: torch.Tensor, cfg: SamplingConfig,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per position of ``logits [B, T, V]``: int64 ``[B, T]``. When sampling, every
    position draws independently (one multinomial per node), which keeps tree verification
    exact (see fastdecode.ops.verify_tree)."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    B, T, V = logits.shape
    probs = processed_logits(logits, cfg).softmax(-1).view(B * T, V)
    return torch.multinomial(probs, 1, generator=generator).view(B, T)
