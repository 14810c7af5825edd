"""Structured drop-in replacements for ``nn.Linear`` (Wei et al. 2024, "Building on Efficient
Foundations"): :class:`LowRankLinear`, :class:`BlockDenseLinear` and
:class:`BlockShuffleLinear`. None has a nonlinearity inside, so each is exactly a dense matrix of
a restricted family: :meth:`StructuredLinear.to_dense` builds it, and
:meth:`~StructuredLinear.merge`
keeps it beside the factors for calls with few tokens (the paper's pre-merge).

Every layer takes ``[..., in_features]`` inputs (any leading dims, any strides) and returns
``[..., out_features]`` in the input's dtype; weights follow ``nn.Linear``'s out x in
convention. Paths per call (see :meth:`StructuredLinear.path`): the merged dense weight when
merged and the call has at most ``merge_threshold`` tokens and needs no gradient; on CUDA the
decoding kernels for at most ``MAX_DECODE_TOKENS`` tokens without gradient; else the
structured product (autograd through the factors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdecode.ops import _validate
from fastdecode.ops.structured import (
    MAX_DECODE_TOKENS,
    block_dense_decode,
    block_shuffle,
    block_shuffle_decode,
    dense_decode,
    lowrank_decode,
)

INIT_STD = 0.02
"""The paper's (GPT-2) init scale: every weight starts from N(0, 0.02^2)."""
MERGE_THRESHOLD = 16
"""Default most tokens per call that take the merged dense weight once merged."""


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the dtype to build dense matrices in: fp64 stays, the rest becomes fp32."""
    return t if t.dtype == torch.float64 else t.float()


def autocast_args(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` cast to the autocast dtype when autocast is on for their device (the ops are
    custom ops, which autocast does not reach), else unchanged."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def _polar(g: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``A B^T`` of ``g = A S B^T`` (all singular values 1)."""
    a, _, bt = torch.linalg.svd(g, full_matrices=False)
    return a @ bt


def _split_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left [rows, rank], right [rank, cols])`` with ``left @ right`` the best rank-``rank``
    approximation of ``w`` and the singular values split evenly (``sqrt(S)`` on each side);
    columns past ``min(rows, cols)`` are zero."""
    w = _wide(w)
    a, sv, bt = torch.linalg.svd(w, full_matrices=False)
    q = min(rank, sv.numel())
    root = sv[:q].sqrt()
    left = w.new_zeros(w.shape[0], rank)
    right = w.new_zeros(rank, w.shape[1])
    left[:, :q] = a[:, :q] * root
    right[:q] = root[:, None] * bt[:q]
    return left, right


def _weight_and_bias(dense: nn.Linear | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(dense, nn.Linear):
        return dense.weight.detach(), None if dense.bias is None else dense.bias.detach()
    _validate.tensor("dense", dense, None, 2, "[out_features, in_features]")
    return dense.detach(), None


class StructuredLinear(nn.Module):
    """What every structured layer shares: the bias, the merged dense weight and the per-call
    choice of path. Subclasses define the factors, :meth:`to_dense`, the structured product
    and the decoding product.

    Attributes:
        merge_threshold: the most tokens (rows after flattening) a call may have to take the
            merged weight, once :meth:`merge` was called.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 device: torch.device | str | None, dtype: torch.dtype | None,
                 merge_threshold: int) -> None:
        super().__init__()
        self.in_features = _validate.integer("in_features", in_features, 1)
        self.out_features = _validate.integer("out_features", out_features, 1)
        self.merge_threshold = _validate.integer("merge_threshold", merge_threshold, 0)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._merged: torch.Tensor | None = None
        self._merged_versions: tuple[int, ...] = ()

    # -- what subclasses define --

    def factors(self) -> list[torch.Tensor]:
        """The structured weights (not the bias)."""
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The explicit ``[out_features, in_features]`` matrix (differentiable, factors' dtype;
        the bias is not included)."""
        raise NotImplementedError

    def _structured(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- shared --

    @property
    def num_params(self) -> int:
        """Parameters of the structured weights (bias excluded, as in the paper's counts)."""
        return sum(f.numel() for f in self.factors())

    def flops(self, tokens: int) -> int:
        """Multiply-accumulates of a forward call on ``tokens`` tokens (bias excluded): one per
        parameter per token for every structure."""
        return self.num_params * _validate.integer("tokens", tokens, 0)

    @property
    def merged(self) -> bool:
        """Whether :meth:`merge` keeps a dense copy of the weight."""
        return self._merged is not None

    def merge(self) -> None:
        """Keeps the dense equivalent (:meth:`to_dense`) beside the factors for calls with at
        most ``merge_threshold`` tokens that need no gradient. The copy is rebuilt when a
        factor changes in place (an optimizer step) and is not part of the state dict."""
        with torch.no_grad():
            self._merged = self.to_dense().detach()
        self._merged_versions = self._versions()

    def unmerge(self) -> None:
        """Drops the dense copy kept by :meth:`merge`."""
        self._merged = None
        self._merged_versions = ()

    def _versions(self) -> tuple[int, ...]:
        return tuple(f._version for f in self.factors())

    def merged_weight(self) -> torch.Tensor:
        """The merged dense weight, rebuilt first if a factor changed since :meth:`merge`."""
        if self._merged is None:
            raise RuntimeError("merged_weight() needs merge() first")
        stale = self._versions() != self._merged_versions
        if stale or self._merged.device != self.factors()[0].device:
            self.merge()
        return self._merged

    def path(self, tokens: int, needs_grad: bool, device: torch.device) -> str:
        """Which product a call runs: ``"merged"``, ``"decode"`` or ``"structured"``."""
        if needs_grad:
            return "structured"
        if self._merged is not None and tokens <= self.merge_threshold:
            return "merged"
        if device.type == "cuda" and 1 <= tokens <= MAX_DECODE_TOKENS:
            return "decode"
        return "structured"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have in_features = {self.in_features} in its last dim, "
                             f"found shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters()))
        path = self.path(x2.shape[0], needs_grad, x.device)
        if path == "merged":
            w = self.merged_weight()
            if x.is_cuda and 1 <= x2.shape[0] <= MAX_DECODE_TOKENS:
                y = dense_decode(*autocast_args(x2, w))
            else:
                y = F.linear(x2, w)
        elif path == "decode":
            y = self._decode(x2)
        else:
            y = self._structured(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _skip_init(self) -> bool:
        return any(f.is_meta for f in self.factors())

    def _draw_blocks(self, *weights: nn.Parameter) -> None:
        """Draws each weight (a stack of blocks or a matrix) from N(0, INIT_STD²), made
        orthogonal per block (``init="ortho"``) or kept as drawn (``"normal"``)."""
        if self._skip_init():
            return
        with torch.no_grad():
            for w in weights:
                g = torch.empty(w.shape, device=w.device).normal_(0.0, INIT_STD)
                w.copy_(g if self.init == "normal" else _polar(g))


class LowRankLinear(StructuredLinear):
    """``y = U (V x) + bias`` with ``v [rank, in_features]`` and ``u [out_features, rank]``.

    Args:
        in_features, out_features: the widths.
        rank: ``1 <= rank <= min(in_features, out_features)``.
        bias: add a learned bias (zero-initialised).
        init: ``"svd"`` (the paper's spectral init: the best rank-``rank`` approximation of an
            N(0, 0.02^2) dense draw, singular values split evenly between U and V) or
            ``"normal"`` (each factor N(0, 0.02^2)).
        merge_threshold: see :class:`StructuredLinear`.
        device, dtype: of the parameters (``"meta"`` skips the init).

    Parameters and multiply-accumulates per token: ``rank * (in_features + out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, *,
                 init: str = "svd", merge_threshold: int = MERGE_THRESHOLD,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype, merge_threshold)
        self.rank = _validate.integer("rank", rank, 1)
        if rank > min(in_features, out_features):
            raise ValueError(f"rank must be <= min(in_features, out_features) = "
                             f"{min(in_features, out_features)}, found {rank}")
        if init not in ("svd", "normal"):
            raise ValueError(f"init must be 'svd' or 'normal', found {init!r}")
        self.init = init
        self.v = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.u = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draws the factors again with the layer's ``init``."""
        if self._skip_init():
            return
        with torch.no_grad():
            if self.init == "normal":
                self.v.normal_(0.0, INIT_STD)
                self.u.normal_(0.0, INIT_STD)
                return
            g = torch.empty(self.out_features, self.in_features, device=self.v.device)
            left, right = _split_svd(g.normal_(0.0, INIT_STD), self.rank)
            self.u.copy_(left)
            self.v.copy_(right)

    @classmethod
    def from_dense(cls, dense: nn.Linear | torch.Tensor, rank: int, **kwargs) -> LowRankLinear:
        """The truncated SVD of ``dense`` (an ``nn.Linear``, whose bias is copied, or an
        ``[out, in]`` weight): the best rank-``rank`` fit in Frobenius norm, exact when ``rank``
        is ``min(in, out)``. ``kwargs`` go to the constructor."""
        w, b = _weight_and_bias(dense)
        layer = cls(w.shape[1], w.shape[0], rank, bias=b is not None, device=w.device,
                    dtype=kwargs.pop("dtype", w.dtype), **kwargs)
        left, right = _split_svd(w, rank)
        with torch.no_grad():
            layer.u.copy_(left)
            layer.v.copy_(right)
            if b is not None:
                layer.bias.copy_(b)
        return layer

    def factors(self) -> list[torch.Tensor]:
        return [self.v, self.u]

    def to_dense(self) -> torch.Tensor:
        return (_wide(self.u) @ _wide(self.v)).to(self.u.dtype)

    def _structured(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_decode(*autocast_args(x, self.v, self.u))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


class BlockDenseLinear(StructuredLinear):
    """``y = U BlockDiag(V_1..V_b) x + bias``: block k of ``v [blocks, rank/blocks,
    in_features/blocks]`` maps input slice k to rank slice k, then ``u [out_features, rank]``
    mixes all. One block is :class:`LowRankLinear`.

    Args:
        in_features, out_features: the widths; ``blocks`` must divide ``in_features``.
        rank: ``1 <= rank <= min(in_features, out_features)``, a multiple of ``blocks``.
        blocks: ``>= 1``.
        bias: add a learned bias (zero-initialised).
        init: ``"ortho"`` (the paper's: every block and U become the orthogonal polar factor
            of a Gaussian draw) or ``"normal"`` (N(0, 0.02^2)).
        merge_threshold: see :class:`StructuredLinear`.
        device, dtype: of the parameters.

    Parameters and MACs per token: ``rank * (out_features + in_features / blocks)``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, blocks: int,
                 bias: bool = False, *, init: str = "ortho",
                 merge_threshold: int = MERGE_THRESHOLD,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype, merge_threshold)
        self.rank = _validate.integer("rank", rank, 1)
        self.blocks = _validate.integer("blocks", blocks, 1)
        if rank > min(in_features, out_features):
            raise ValueError(f"rank must be <= min(in_features, out_features) = "
                             f"{min(in_features, out_features)}, found {rank}")
        if in_features % blocks or rank % blocks:
            raise ValueError(f"blocks must divide in_features and rank, found blocks={blocks}, "
                             f"in_features={in_features}, rank={rank}")
        if init not in ("ortho", "normal"):
            raise ValueError(f"init must be 'ortho' or 'normal', found {init!r}")
        self.init = init
        self.v = nn.Parameter(torch.empty(blocks, rank // blocks, in_features // blocks,
                                          device=device, dtype=dtype))
        self.u = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draws the factors again with the layer's ``init``."""
        self._draw_blocks(self.v, self.u)

    @classmethod
    def from_dense(cls, dense: nn.Linear | torch.Tensor, rank: int, blocks: int,
                   **kwargs) -> BlockDenseLinear:
        """The best fit in Frobenius norm: ``U BD(V)`` restricted to input slice k is
        ``U_k V_k`` (U's rank slice k), so each column slice of ``dense`` gets its own
        truncated SVD of rank ``rank / blocks``. Exact when ``rank/blocks >= min(out,
        in/blocks)``. Copies an ``nn.Linear``'s bias; ``kwargs`` go to the constructor."""
        w, b = _weight_and_bias(dense)
        layer = cls(w.shape[1], w.shape[0], rank, blocks, bias=b is not None, device=w.device,
                    dtype=kwargs.pop("dtype", w.dtype), **kwargs)
        p, rb = w.shape[1] // blocks, rank // blocks
        with torch.no_grad():
            for k in range(blocks):
                left, right = _split_svd(w[:, k * p:(k + 1) * p], rb)
                layer.u[:, k * rb:(k + 1) * rb] = left
                layer.v[k] = right
            if b is not None:
                layer.bias.copy_(b)
        return layer

    def factors(self) -> list[torch.Tensor]:
        return [self.v, self.u]

    def to_dense(self) -> torch.Tensor:
        return (_wide(self.u) @ torch.block_diag(*_wide(self.v))).to(self.u.dtype)

    def _structured(self, x: torch.Tensor) -> torch.Tensor:
        b, rb, p = self.v.shape
        t = torch.einsum("tkc,krc->tkr", x.reshape(x.shape[0], b, p), self.v)
        return F.linear(t.reshape(x.shape[0], b * rb), self.u)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        return block_dense_decode(*autocast_args(x, self.v, self.u))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, blocks={self.blocks}, bias={self.bias is not None}")


def shuffle_maps(blocks: int, m: int, s: int, device: torch.device | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockShuffle's permutations as index vectors: ``mid[j*m + i] = i*b + j`` (row j*m+i of
    the shuffled stage-1 output is row i*b+j of the block-major one) and
    ``out[o*b + j] = j*s + o`` (output feature o*b+j is row o of stage-2 block j)."""
    mid = torch.arange(blocks * m, device=device).reshape(m, blocks).T.reshape(-1)
    out = torch.arange(blocks * s, device=device).reshape(blocks, s).T.reshape(-1)
    return mid, out


class BlockShuffleLinear(StructuredLinear):
    """Monarch: ``y = P_out BD(W2) P_mid BD(W1) x + bias`` with ``w1 [b, m, p]`` and
    ``w2 [b, s, m]``, ``p = in/b``, ``s = out/b``, ``m = min(p, s)``, and the index maps of
    :mod:`fastdecode.ops.structured` (stage-2 block j reads ``h[i*b + j]`` and writes
    ``y[o*b + j]``).

    Args:
        in_features, out_features: the widths, both multiples of ``blocks``.
        blocks: ``>= 1``.
        bias: add a learned bias (zero-initialised).
        init: ``"ortho"`` (every block the orthogonal polar factor of a Gaussian draw) or
            ``"normal"`` (N(0, 0.02^2)).
        merge_threshold: see :class:`StructuredLinear`.
        device, dtype: of the parameters.

    Parameters and MACs per token: ``min(in, out) * (in + out) / blocks``.
    """

    def __init__(self, in_features: int, out_features: int, blocks: int, bias: bool = False,
                 *, init: str = "ortho", merge_threshold: int = MERGE_THRESHOLD,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype, merge_threshold)
        self.blocks = _validate.integer("blocks", blocks, 1)
        if in_features % blocks or out_features % blocks:
            raise ValueError(f"blocks must divide in_features and out_features, found "
                             f"blocks={blocks}, in_features={in_features}, "
                             f"out_features={out_features}")
        if init not in ("ortho", "normal"):
            raise ValueError(f"init must be 'ortho' or 'normal', found {init!r}")
        self.init = init
        p, s = in_features // blocks, out_features // blocks
        m = min(p, s)
        self.w1 = nn.Parameter(torch.empty(blocks, m, p, device=device, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(blocks, s, m, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draws the blocks again with the layer's ``init``."""
        self._draw_blocks(self.w1, self.w2)

    @classmethod
    def from_dense(cls, dense: nn.Linear | torch.Tensor, blocks: int,
                   **kwargs) -> BlockShuffleLinear:
        """The best fit in Frobenius norm (Monarch projection): the sub-block of rows
        ``j::b`` and input slice k depends only on the columns ``i`` of ``w2[j]`` with
        ``(i*b + j) // m == k`` and on the matching rows of ``w1[k]``, disjoint across (j, k),
        so each sub-block gets its own truncated SVD. Copies an ``nn.Linear``'s bias;
        ``kwargs`` go to the constructor."""
        w, bias = _weight_and_bias(dense)
        layer = cls(w.shape[1], w.shape[0], blocks, bias=bias is not None, device=w.device,
                    dtype=kwargs.pop("dtype", w.dtype), **kwargs)
        b = blocks
        _, m, p = layer.w1.shape
        s = layer.w2.shape[1]
        i = torch.arange(m)
        with torch.no_grad():
            w1 = _wide(w).new_zeros(layer.w1.shape)
            w2 = _wide(w).new_zeros(layer.w2.shape)
            for j in range(b):
                for k in range(b):
                    cols = i[(i * b + j) // m == k].to(w.device)
                    if cols.numel() == 0:
                        continue
                    left, right = _split_svd(w[j::b, k * p:(k + 1) * p], cols.numel())
                    w2[j][:, cols] = left
                    w1[k][(cols * b + j) % m] = right
            layer.w1.copy_(w1)
            layer.w2.copy_(w2)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def factors(self) -> list[torch.Tensor]:
        return [self.w1, self.w2]

    def to_dense(self) -> torch.Tensor:
        b, m, _ = self.w1.shape
        mid, out = shuffle_maps(b, m, self.w2.shape[1], self.w1.device)
        h = torch.block_diag(*_wide(self.w1))  # [b*m, in], rows block-major
        y = torch.block_diag(*_wide(self.w2)) @ h[mid]  # rows (block j, row o)
        return y[out].to(self.w1.dtype)

    def _structured(self, x: torch.Tensor) -> torch.Tensor:
        return block_shuffle(*autocast_args(x, self.w1, self.w2))

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        return block_shuffle_decode(*autocast_args(x, self.w1, self.w2))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"blocks={self.blocks}, bias={self.bias is not None}")


KINDS = ("dense", "lowrank", "blockdense", "blockshuffle")


def make_linear(kind: str, in_features: int, out_features: int, rank: int | None = None,
                blocks: int | None = None, bias: bool = False, **kwargs) -> nn.Module:
    """A linear layer of ``kind`` (one of :data:`KINDS`; ``"dense"`` is ``nn.Linear`` with the
    paper's N(0, 0.02^2) init). ``rank`` is required by lowrank and blockdense, ``blocks`` by
    blockdense and blockshuffle, and each is refused where unused. ``kwargs`` (init,
    merge_threshold, device, dtype) go to the constructor."""
    _check_kind(kind, rank, blocks)
    if kind == "dense":
        kwargs.pop("init", None)
        kwargs.pop("merge_threshold", None)
        layer = nn.Linear(in_features, out_features, bias=bias, **kwargs)
        if not layer.weight.is_meta:
            with torch.no_grad():
                layer.weight.normal_(0.0, INIT_STD)
                if layer.bias is not None:
                    layer.bias.zero_()
        return layer
    if kind == "lowrank":
        return LowRankLinear(in_features, out_features, rank, bias, **kwargs)
    if kind == "blockdense":
        return BlockDenseLinear(in_features, out_features, rank, blocks, bias, **kwargs)
    return BlockShuffleLinear(in_features, out_features, blocks, bias, **kwargs)


def linear_from_dense(kind: str, dense: nn.Linear | torch.Tensor, rank: int | None = None,
                      blocks: int | None = None, **kwargs) -> nn.Module:
    """``kind``'s best fit of ``dense`` (see each class's ``from_dense``); ``"dense"`` copies
    it into a new ``nn.Linear``."""
    _check_kind(kind, rank, blocks)
    if kind == "lowrank":
        return LowRankLinear.from_dense(dense, rank, **kwargs)
    if kind == "blockdense":
        return BlockDenseLinear.from_dense(dense, rank, blocks, **kwargs)
    if kind == "blockshuffle":
        return BlockShuffleLinear.from_dense(dense, blocks, **kwargs)
    w, b = _weight_and_bias(dense)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device,
                      dtype=kwargs.get("dtype", w.dtype))
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)
    return layer


def linear_params(layer: nn.Module) -> int:
    """Weight parameters (biases excluded) of a linear layer of any kind."""
    if isinstance(layer, nn.Linear):
        return layer.weight.numel()
    return layer.num_params


def _check_kind(kind: str, rank: int | None, blocks: int | None) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; found {kind!r}")
    needs_rank = kind in ("lowrank", "blockdense")
    needs_blocks = kind in ("blockdense", "blockshuffle")
    for name, value, needed in (("rank", rank, needs_rank), ("blocks", blocks, needs_blocks)):
        if needed and value is None:
            raise ValueError(f"kind={kind!r} needs {name}")
        if not needed and value is not None:
            raise ValueError(f"kind={kind!r} takes no {name}, found {name}={value}")


__all__ = ["INIT_STD", "KINDS", "MERGE_THRESHOLD", "BlockDenseLinear", "BlockShuffleLinear",
           "LowRankLinear", "StructuredLinear", "linear_from_dense", "linear_params",
           "make_linear", "shuffle_maps"]
