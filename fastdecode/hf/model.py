"""Running a transformers causal LM one draft tree at a time: prefill, tree forwards against a
per-row KV cache, and committing the accepted path's KV in place.

Cache layout: one transformers ``DynamicCache`` of physical length S shared by the batch. Row b's
valid keys are rows ``[kv_start[b], kv_len[b])`` (``kv_start`` skips left padding); rows past
``kv_len[b]`` may hold stale entries of other rows' longer acceptances and are never attended.
A tree step appends its T tokens at rows ``S .. S+T-1`` for every batch row.

Sliding windows: the cache keeps every layer's full history, sliding-window layers included
(transformers would give those a rolling cache of the window's length, whose rows cannot be
compacted per row), and the window is applied where the keys are read: by the ``fastdecode``
attention, or by the 4-D masks the runner builds for sdpa and eager (one per layer type). A
sliding layer's cache therefore costs as much memory as a full layer's.
"""

from __future__ import annotations

import inspect
import time
from typing import Callable, NamedTuple

import torch

from fastdecode.decoding.step_costs import PROBE_TOKENS, StepCosts, costs_of
from fastdecode.ops import compact_kv, pack_tree_mask, tree_mask, tree_positions

SUPPORTED_ATTENTION = ("fastdecode", "sdpa", "eager")
LAYER_TYPES = ("full_attention", "sliding_attention")


class TreeStep(NamedTuple):
    """What the ``fastdecode`` attention reads during a tree step (the model receives it as the
    keyword argument ``fastdecode_tree``): per-row prefix ranges ``kv_start``/``kv_len`` (int64
    ``[B]``), the first cache row of the step's tokens ``seg_start``, and the step's packed tree
    mask (int32 ``[B, T, ceil(T/32)]``)."""

    kv_start: torch.Tensor
    kv_len: torch.Tensor
    seg_start: int
    packed_mask: torch.Tensor


def check_model(model: object) -> None:
    """Raises a clear error when ``model`` cannot run tree steps (custom masks and a cache)."""
    from transformers import PreTrainedModel

    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, found {name}")
    if not getattr(model, "_supports_attention_backend", False):
        raise TypeError(
            f"{name} cannot take custom attention masks: fastdecode needs a causal LM built on "
            "transformers' attention interface (Llama, Qwen2, GPT-2 and most recent models)"
        )
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise TypeError(f"{name} has no language-model head; pass a *ForCausalLM model")
    if getattr(model.config, "is_encoder_decoder", False):
        raise TypeError(f"{name} is an encoder-decoder model; fastdecode decodes causal LMs")
    unknown = sorted(set(getattr(model.config, "layer_types", None) or ()) - set(LAYER_TYPES))
    if unknown:
        raise TypeError(f"{name} has layers of type {', '.join(unknown)}; fastdecode runs "
                        f"{' and '.join(LAYER_TYPES)} layers")
    impl = model.config._attn_implementation
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"{name} uses attn_implementation={impl!r}; tree steps need one of "
            f"{', '.join(SUPPORTED_ATTENTION)} (load it with attn_implementation='sdpa')"
        )


def _new_cache() -> object:
    """A transformers ``DynamicCache`` of full layers only (see the module docstring)."""
    from transformers import DynamicCache

    return DynamicCache()


def check_cache(cache: object, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Raises a clear error unless ``cache`` can continue ``input_ids`` (``[B, L]``): a
    transformers cache of full layers (fastdecode's own ``past_key_values``; transformers'
    sliding-window layers cannot be compacted per row) for one unpadded row, holding fewer than
    L tokens."""
    from transformers import Cache

    if not isinstance(cache, Cache):
        raise TypeError(f"past_key_values must be a transformers Cache (an earlier "
                        f"fastdecode.generate's past_key_values), found {type(cache).__name__}")
    sliding = [type(layer).__name__ for layer in getattr(cache, "layers", ())
               if getattr(layer, "is_sliding", False)]
    if sliding:
        raise ValueError(f"past_key_values has sliding-window layers ({sliding[0]}); pass the "
                         "past_key_values of an earlier fastdecode.generate, which keeps full "
                         "layers")
    if input_ids.shape[0] != 1 or not bool(attention_mask.all()):
        raise ValueError(f"past_key_values continues one unpadded row; found input_ids of shape "
                         f"{tuple(input_ids.shape)} with "
                         f"{int((attention_mask == 0).sum())} padded positions")
    held, L = cache.get_seq_length(), input_ids.shape[1]
    if held >= L:
        raise ValueError(f"past_key_values holds {held} tokens; input_ids must extend them with "
                         f"at least one more, found {L} tokens")


def mask_windows(config) -> tuple[str, int | None]:
    """How the 4-D masks of a tree step carry ``config``'s sliding window:
    ``("none", None)`` (no layer slides), ``("all", W)`` (every layer slides by W: Mistral,
    Phi3, Mixtral; the model reads one mask) or ``("per_type", W)`` (``layer_types`` mixes full
    and sliding layers: Gemma2/3, Qwen2/3 with ``use_sliding_window``; the model reads a dict
    of one mask per layer type)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return "none", None
    return ("all" if types is None else "per_type"), int(window)


def position_limit(model) -> int | None:
    """The number of positions a model with learned position embeddings has (GPT-2's
    ``n_positions``), past which it cannot run; None for rotary and other relative positions,
    which transformers lets run past ``max_position_embeddings``."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return None
    tokens = model.get_input_embeddings()
    learned = any(isinstance(m, torch.nn.Embedding) and m is not tokens
                  and m.num_embeddings in (limit, limit + 2)  # OPT offsets its positions by 2
                  for m in model.modules())
    return int(limit) if learned else None


class _Clock:
    """Times calls: the host clock on the CPU; on a GPU, CUDA events read once they have
    completed (:meth:`poll` never waits), so timing adds no host sync."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0  # every timed call whose time is known
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event, Callable]] = []

    def time(self, fn: Callable, record: Callable[[float], None]) -> object:
        """Runs ``fn()``; ``record(seconds)`` is called once its time is known."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            self._pending.append((start, end, record))
            return out
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        record(seconds)
        return out

    def poll(self, wait: bool = False) -> None:
        """Reads the events that have completed (all of them, after a sync, with ``wait``)."""
        if wait and self._pending:
            self._pending[-1][1].synchronize()
        while self._pending and self._pending[0][1].query():
            start, end, record = self._pending.pop(0)
            seconds = start.elapsed_time(end) / 1e3
            self.seconds += seconds
            record(seconds)


def _ignore(seconds: float) -> None:
    return None


class TreeRunner:
    """One batch of sequences of one model: prefill, tree forwards and KV commits.

    The runner times its forwards: :attr:`forward_s` sums them (prefill included), and every
    tree forward is added to the model's :class:`~fastdecode.decoding.step_costs.StepCosts`, which
    :meth:`step_costs` reads (a step budget's cost side)."""

    def __init__(self, model) -> None:
        check_model(model)
        self.model = model
        device = model.get_output_embeddings().weight.device
        self.costs: StepCosts = costs_of(model, device, model.dtype)
        self._clock = _Clock(device)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # the prefill needs the last position's logits only: [B, L, V] would cost a vocabulary
        # projection per prompt token
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._windows = mask_windows(model.config)
        self.position_limit = position_limit(model)
        self.cache = None
        self.kv_start: torch.Tensor | None = None
        self.kv_len: torch.Tensor | None = None
        self.kv_len_host: list[int] = []
        self._masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def seq_len(self) -> int:
        """The cache's physical length S."""
        return max(self.kv_len_host)

    def collect_timings(self) -> None:
        """Hands the timings of every forward so far to :attr:`costs` (on a GPU this waits for
        the forwards)."""
        self._clock.poll(wait=True)

    @property
    def forward_s(self) -> float:
        """Seconds in the model's forwards so far (on a GPU this waits for them)."""
        self.collect_timings()
        return self._clock.seconds

    def step_costs(self, probe_token: torch.Tensor) -> list[tuple[int, float]]:
        """``(tokens fed, seconds)`` of one forward at the current context, in increasing T (see
        :mod:`fastdecode.decoding.step_costs`). A model not timed before is probed first: one
        chain-shaped forward of ``probe_token`` (int64 ``[B, 1]``) per size in
        ``PROBE_TOKENS`` (the single token twice), each cropped off right away, so the output
        cannot change."""
        self._clock.poll()
        if not self.costs.measured():
            B, device = probe_token.shape[0], probe_token.device
            for T in (1,) + PROBE_TOKENS:
                parents = (torch.arange(T, device=device) - 1).expand(B, T).contiguous()
                self.forward(probe_token.expand(B, T).contiguous(), parents)
                self.cache.crop(-T)
            self.collect_timings()
        return self.costs.curve(self.seq_len)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache: object | None = None) -> torch.Tensor:
        """Runs the left-padded prompts ``[B, L]`` (mask 1 on real tokens) and returns the last
        position's logits ``[B, V]``. The last prompt token's KV is kept, like any prefix.

        ``cache``: a cache of full layers (see :func:`check_cache`) that already holds the KV
        of the first P < L tokens of the one unpadded row (an earlier call's
        ``past_key_values``): only the last L - P tokens are run."""
        B, L = input_ids.shape
        cached = 0 if cache is None else cache.get_seq_length()
        self.cache = _new_cache() if cache is None else cache
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self._clock.time(
            lambda: self.model(input_ids=input_ids[:, cached:], attention_mask=attention_mask,
                               position_ids=positions[:, cached:], use_cache=True,
                               **{self._cache_kw: self.cache}, **self._last_logits),
            _ignore)
        self.kv_start = (L - attention_mask.long().sum(-1)).to(input_ids.device)
        self.kv_len = torch.full((B,), L, dtype=torch.int64, device=input_ids.device)
        self.kv_len_host = [L] * B
        return out.logits[:, -1]

    def _tree_masks(self, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(parents, bool mask, packed mask) of a tree, reused while a drafter passes the same
        parents tensor again."""
        if self._masks is None or self._masks[0] is not parents:
            mask = tree_mask(parents, validate=False)
            self._masks = (parents, mask, pack_tree_mask(mask))
        return self._masks

    def forward(self, tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """One forward of a draft tree per row: ``tokens``/``parents`` int64 ``[B, T]`` (node 0
        is each row's last token, whose KV is not cached yet). Node j sits at position
        ``len(row) + depth(j)`` and attends to the row's prefix and its own ancestors (within
        each layer's sliding window). Returns logits ``[B, T, V]``; the cache grows by T rows.
        Its time goes to :attr:`costs`.

        On a model with learned positions, nodes past :attr:`position_limit` run at the last
        position: the caller keeps every position whose prediction is emitted inside it."""
        B, T = tokens.shape
        S = self.seq_len
        self._clock.poll()
        _, mask, packed = self._tree_masks(parents)
        positions = tree_positions(parents, self.kv_len - self.kv_start, validate=False)
        if self.position_limit is not None:
            positions = positions.clamp(max=self.position_limit - 1)
        kwargs = {self._cache_kw: self.cache, "use_cache": True, "position_ids": positions}
        if self.model.config._attn_implementation == "fastdecode":
            kwargs["fastdecode_tree"] = TreeStep(self.kv_start, self.kv_len, S, packed)
        else:
            keys = torch.arange(S, device=tokens.device)
            prefix = (keys >= self.kv_start[:, None]) & (keys < self.kv_len[:, None])
            allowed = torch.cat([prefix[:, None, :].expand(B, T, S), mask], dim=-1)
            style, window = self._windows
            if style == "none":
                kwargs["attention_mask"] = self._additive(allowed)
            else:
                # query minus key positions: prefix row n sits at n - kv_start
                key_pos = torch.cat([(keys - self.kv_start[:, None]).clamp(min=0), positions], 1)
                near = allowed & (positions[:, :, None] - key_pos[:, None, :] < window)
                kwargs["attention_mask"] = self._additive(near) if style == "all" else {
                    "full_attention": self._additive(allowed),
                    "sliding_attention": self._additive(near)}
        return self._clock.time(lambda: self.model(input_ids=tokens, **kwargs).logits,
                                lambda seconds: self.costs.add(S, T, seconds))

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """The additive float mask ``[B, 1, T, S+T]`` (0 or the dtype's min) of bool
        ``allowed [B, T, S+T]``, in the model's dtype."""
        dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return additive.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    def commit(self, path: torch.Tensor, count: torch.Tensor, count_host: list[int]) -> None:
        """Keeps, per row, the KV of the tree nodes ``path[b, :count[b]]`` (root first), moved
        right after the row's prefix, and drops the rest of the step's KV.

        path: int64 ``[B, D+1]`` node indices (-1 past count); count: int64 ``[B]`` on the
        device and the same values on the host (``count_host``)."""
        S = self.seq_len
        src = (S - self.kv_len)[:, None] + path.clamp(min=0)
        compact_kv(self.cache, self.kv_len, src, count, validate=False)
        self.kv_len = self.kv_len + count
        self.kv_len_host = [n + c for n, c in zip(self.kv_len_host, count_host)]
        self.cache.crop(self.seq_len - self.cache.get_seq_length())
