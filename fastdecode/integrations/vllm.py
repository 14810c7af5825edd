"""fastdecode's token trie as the drafter of vLLM's speculative decoding, through vLLM's
``custom_class`` hook::

    LLM(model, speculative_config={"method": "custom_class",
                                   "model": "fastdecode.integrations.vllm.TrieProposer",
                                   "num_speculative_tokens": 8})

vLLM (v1) builds the class with its ``VllmConfig`` and, after each step's sampling, its GPU model
runner calls :meth:`TrieProposer.propose` with the batch's tokens, then verifies the returned
chains in the next step. Nothing here imports vLLM: the configuration is read by attribute.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from fastdecode import _native
from fastdecode.decoding.budget import MARGIN
from fastdecode.decoding.trie_cache import TrieCache
from fastdecode.integrations.engine_costs import EngineStepCosts
from fastdecode.ops import _validate

TOKEN_COST_ENV = "FASTDECODE_VLLM_TOKEN_COST"
_MISSING = object()


def _attr(obj: object, path: str) -> object:
    """``obj.<path>`` (a dotted path), or ``_MISSING`` where a link is absent or None."""
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return _MISSING
    return obj


def _vocab_size(vllm_config: object) -> int:
    get = _attr(vllm_config, "model_config.get_vocab_size")
    if callable(get):
        field, value = "model_config.get_vocab_size()", get()
    else:
        field = "model_config.hf_config.vocab_size"
        value = _attr(vllm_config, field)
    if value is _MISSING or value is None:
        raise ValueError("vllm_config gives no vocabulary size: expected an int from "
                         "model_config.get_vocab_size() or model_config.hf_config.vocab_size, "
                         "found neither")
    return _validate.integer(f"vllm_config.{field}", value, 1, 2**31 - 1)


def _host(name: str, x: object) -> np.ndarray:
    """``x`` (a numpy array, a torch tensor on any device, or a list) as a numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a numpy array, torch tensor or list, "
                        f"found {type(x).__name__}") from None


class _Lookup:
    """A chain drafted after a request's first tokens, scored against the tokens that came
    next: ``matched`` of its drafts agree with them, ``final`` once one disagrees or the chain
    is used up; ``chances``: its drafts' running chances under the trie's counts; ``context``:
    the context length it matched; ``expected``: the sum of its drafts' calibrated chances of
    acceptance when drafted (before the request's own calibration)."""

    __slots__ = ("chain", "chances", "context", "expected", "matched", "final")

    def __init__(self, chain: list[int], chances: list[float], context: int,
                 expected: float) -> None:
        self.chain, self.chances, self.context, self.expected = chain, chances, context, expected
        self.matched = 0
        self.final = False

    def advance(self, new: list[int]) -> None:
        for t in new:
            if self.final:
                return
            if t == self.chain[self.matched]:
                self.matched += 1
                self.final = self.matched == len(self.chain)
            else:
                self.final = True


class _Request:
    """What the proposer holds for one request, in whichever row holds it: the tokens inserted
    into its request-local counts (``tokens[:n]``, int32), where its prompt ended, its
    calibration (decayed sums over its scored chains of the drafts that agreed with what came
    next, ``hits``, and of what the position-corrected counts expected, ``expected``), its
    chains awaiting their outcome, and the length of its last draft."""

    __slots__ = ("rid", "tokens", "n", "prompt_len", "hits", "expected", "pending", "draft_len")

    def __init__(self, rid: int, tokens: np.ndarray, prompt_len: int) -> None:
        self.rid, self.n, self.prompt_len = rid, len(tokens), prompt_len
        self.tokens = np.empty(max(64, 2 * len(tokens)), dtype=np.int32)
        self.tokens[:self.n] = tokens
        self.hits = self.expected = 0.0
        self.pending: list[_Lookup] = []
        self.draft_len = 0

    def prefix_of(self, row: np.ndarray, n: int) -> bool:
        """Whether the inserted tokens are exactly the first ``self.n`` of ``row[:n]``."""
        return self.n <= n and np.array_equal(self.tokens[:self.n], row[:self.n])

    def extend(self, new: np.ndarray) -> None:
        end = self.n + len(new)
        if end > len(self.tokens):
            grown = np.empty(2 * end, dtype=np.int32)
            grown[:self.n] = self.tokens[:self.n]
            self.tokens = grown
        self.tokens[self.n:end] = new
        self.n = end


class TrieProposer:
    """vLLM's drafter from fastdecode's :class:`~fastdecode.decoding.TrieCache`: each step it
    drafts, per row of the batch, a chain of at most ``num_speculative_tokens`` tokens that the
    trie predicts after the row's text, or nothing where drafting does not pay.

    **The trie.** One :class:`TrieCache` (``self.trie``, ``MAX_NODES_TOTAL`` nodes, least
    recently used eviction) holds the *shared* counts (every finished request's output, with
    the prompt tokens it followed) and, per live request, its *request-local* counts (its prompt
    and output so far), visible only to that request's retrievals. The whole batch is drafted
    in one native call that releases the GIL (:meth:`TrieCache.draft_chains
    <fastdecode.decoding.TrieCache.draft_chains>`): per row, for each length k of its last
    ``MATCH_LEN`` tokens that the trie holds, and in each of the request's counts and the
    shared counts, the chain of most frequent continuations, cut where the running product of
    the count ratios (the chance of the chain so far) falls below ``MIN_PROB`` and at
    ``MATCH_FACTOR * k`` tokens (a short match predicts little; the gains below cut further);
    the chain whose chances sum highest wins. The draft is its first tokens, as many as pay
    (below), and never past ``max_model_len``.

    **Requests without request ids.** vLLM passes rows, not requests, and reuses and reorders
    rows as requests finish, join and are preempted. The proposer keeps, per request, the tokens
    it inserted into that request's counts, and a row holds the same request exactly when those
    tokens are a prefix of ``token_ids_cpu[row, :num_tokens_no_spec[row]]`` (a numpy comparison
    of the whole prefix, every step). A row whose tokens do not start with its request's tokens
    (a new request in the row, a reordered batch, a preempted request starting over) detaches
    that request; a row without a request takes a detached request whose tokens are a prefix of
    its own (found by its length before this step's tokens and its last token, then compared in
    full) or else starts a new request from its current tokens. A detached request taken by no
    row ends: its output goes to the shared counts, then its request-local counts are released.
    Since a trie's content depends only on the tokens inserted, a request whose tokens are a
    prefix of a row's holds exactly the counts a fresh start would insert: no row is ever
    served another request's counts. Rows whose sampled list is empty (prefilling, or unused)
    get no draft and cost the comparison only; rows past the batch are detached.

    **How much to draft.** vLLM owns the forward, so the proposer times the engine from the
    outside: the interval between two calls is one engine step (:class:`~fastdecode.
    integrations.engine_costs.EngineStepCosts`; steps during which a request joined are left
    out), fitted over recent steps as ``a + r * rows + b * drafts`` seconds and, for each
    ``(rows, drafts)`` seen often enough, the median of its own step times (a CPU engine's
    matrix kernels change with the tokens fed, so a one-row step feeding 4 tokens can take
    less than one feeding 1). Each draft token carries a gain, its chance of acceptance: the
    product, along the chain, of each draft's chance of agreeing once the drafts before it
    did, calibrated per cell of (matched context length 1, 2, 3 or more; the count ratio of
    that draft, binned at ``RATIO_EDGES``; its position 1, 2, 3 or later): the decayed share
    (``CALIBRATION_DECAY``) of the drafts in the cell that agreed, shrunk toward the count
    ratio with ``CALIBRATION_PRIOR`` weight; times the request's own calibration s (its
    drafts that agreed over the gains that promised them, decayed by ``DECAY``, with
    ``PRIOR`` weight on 1), at most 1. (Replayed over chains recorded in vLLM runs of the
    built-in prompts and the editing sessions, these cells cut the log loss of the gains by
    3-21% against one factor per context length and position on the running chance.) Every
    chain is scored as the row's next tokens come out, whether or not it was drafted in full,
    so the cells see the tokens that were cut too. The batch then drafts the D tokens of
    highest gain (a prefix of each chain, since its gains do not grow along it), D chosen for
    the most expected tokens (rows plus gains) per expected step time, and drafts at all
    only where that beats plain decoding by ``MARGIN`` (5%). Drafting so pays wherever the
    forward is bound by fixed costs (a GPU at small batches) and stops where every token
    costs (a CPU, large batches); a request that never copies soon drafts nothing. Before the
    fit a draft token is priced at ``TOKEN_COST`` of one row's plain step (environment:
    ``FASTDECODE_VLLM_TOKEN_COST``); while the drafts do not vary, one step in
    ``EngineStepCosts.EXPLORE_EVERY`` drafts half as much.

    Settings (class attributes): ``TOKEN_COST`` (a draft token's price before a fit),
    ``MATCH_LEN`` (the most trailing tokens matched), ``MIN_PROB`` and ``MATCH_FACTOR`` (the
    chain cuts), ``RATIO_EDGES``, ``CALIBRATION_PRIOR`` and ``CALIBRATION_DECAY`` (the cells,
    their prior weight and their weight of the past per draft scored), ``PRIOR`` and ``DECAY``
    (the same for a request's own calibration, per chain), ``MAX_NODES_TOTAL`` (the trie's node
    budget, about 190 bytes a node).

    Args:
        vllm_config: vLLM's ``VllmConfig``; read: ``speculative_config.num_speculative_tokens``
            (the most drafts per row, k), the vocabulary size from
            ``model_config.get_vocab_size()`` (else ``model_config.hf_config.vocab_size``) and
            ``scheduler_config.max_num_seqs`` where present.
    """

    TOKEN_COST = 0.25
    MATCH_LEN = 8
    MIN_PROB = 0.1
    MATCH_FACTOR = 2.0
    PRIOR = 1.0
    MAX_NODES_TOTAL = 1 << 20
    DECAY = 0.9
    RATIO_EDGES = (0.2, 0.4, 0.6, 0.8, 0.999)
    CALIBRATION_PRIOR = 4.0
    CALIBRATION_DECAY = 0.99
    CELLS = 4  # matched context lengths 1, 2, 3, >= 4; draft positions 1, 2, 3, >= 4

    def __init__(self, vllm_config: object) -> None:
        field = "vllm_config.speculative_config.num_speculative_tokens"
        k = _attr(vllm_config, "speculative_config.num_speculative_tokens")
        if k is _MISSING:
            raise ValueError(f"{field} is missing: expected an int >= 1 (the most draft tokens "
                             "per step)")
        limit = _native._C.trie_max_branch_length if _native.cpu_built() else None
        self.k = _validate.integer(field, k, 1, limit)
        self.vocab_size = _vocab_size(vllm_config)
        rows = _attr(vllm_config, "scheduler_config.max_num_seqs")
        rows = 0 if rows is _MISSING else _validate.integer(
            "vllm_config.scheduler_config.max_num_seqs", rows, 1)
        self.token_cost = self._token_cost()
        self.trie = TrieCache(self.vocab_size, decoding_length=self.k + 2, branch_length=self.k,
                              match_len=self.MATCH_LEN, max_nodes_total=self.MAX_NODES_TOTAL)
        self._choices: Counter[str] = Counter()
        shape = (self.CELLS, len(self.RATIO_EDGES) + 1, self.CELLS)
        self._agreed = np.zeros(shape)  # per (context, ratio bin, position) cell, decayed
        self._scored = np.zeros(shape)
        self.costs = EngineStepCosts()
        self._last_active: set[int] = set()
        self._window = self.trie.match_len + self.trie.branch_length
        self._rows: list[_Request | None] = [None] * rows
        self._rids = itertools.count()
        self._started = self._steps = self._drafted = self._accepted = 0
        self._host_s = 0.0

    @classmethod
    def _token_cost(cls) -> float:
        raw = os.environ.get(TOKEN_COST_ENV)
        if raw is None:
            name, value = f"{cls.__name__}.TOKEN_COST", cls.TOKEN_COST
        else:
            name = TOKEN_COST_ENV
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{TOKEN_COST_ENV} must be a number >= 0, found {raw!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, found {value!r}")
        return float(value)

    def load_model(self, *args: object, **kwargs: object) -> None:
        """vLLM's hook to load a draft model; the trie needs none."""

    def propose(self, sampled_token_ids: Sequence[Sequence[int] | None],
                num_tokens_no_spec: np.ndarray | Sequence[int] | torch.Tensor,
                token_ids_cpu: np.ndarray | torch.Tensor,
                slot_mappings: object = None) -> list[list[int]]:
        """This step's drafts, one chain per row of the batch.

        Args:
            sampled_token_ids: B rows (lists, numpy arrays or 1-D tensors of ints): the tokens
                each row got this step (empty, or None, for a row still prefilling or unused).
            num_tokens_no_spec: ``[>= B]`` ints: row i's valid token count.
            token_ids_cpu: ``[>= B, max_model_len]`` integer array (vLLM: numpy int32): each
                row's prompt then output, this step's tokens included.
            slot_mappings: vLLM's KV-cache slots; not used.

        Returns:
            B lists of python ints, each at most ``num_speculative_tokens`` long (``[]``: no
            draft for the row).
        """
        tokens = _host("token_ids_cpu", token_ids_cpu)
        counts = _host("num_tokens_no_spec", num_tokens_no_spec)
        B = len(sampled_token_ids)
        if tokens.ndim != 2 or tokens.shape[0] < B or counts.ndim != 1 or counts.shape[0] < B:
            raise ValueError(f"propose got {B} rows, token_ids_cpu of shape {tokens.shape} and "
                             f"num_tokens_no_spec of shape {counts.shape}: expected [>= {B}, L] "
                             f"and [>= {B}]")
        sampled_counts = [0 if s is None else len(s) for s in sampled_token_ids]
        scheduled = {i for i, c in enumerate(sampled_counts) if c}
        # the last step ran only the rows drafted for last time: no prefill in the interval
        self.costs.call_started(len(scheduled) == B and scheduled <= self._last_active)
        began = time.perf_counter()
        drafts = self._propose(tokens, counts, sampled_counts)
        self._host_s += time.perf_counter() - began
        self._last_active = {i for i, d in enumerate(drafts) if d is not None}
        self.costs.call_ended(len(self._last_active), sum(len(d) for d in drafts if d))
        return [[] if d is None else d for d in drafts]

    def _propose(self, tokens: np.ndarray, counts: np.ndarray,
                 sampled_counts: list[int]) -> list[list[int] | None]:
        """The drafts of :meth:`propose`, None for the rows that are not decoding."""
        B = len(sampled_counts)
        if len(self._rows) < B:
            self._rows += [None] * (B - len(self._rows))
        detached: dict[tuple[int, int], list[_Request]] = {}

        def detach(req: _Request) -> None:
            detached.setdefault((req.n, int(req.tokens[req.n - 1])), []).append(req)

        for i in range(B, len(self._rows)):
            if self._rows[i] is not None:
                detach(self._rows[i])
                self._rows[i] = None
        active = []  # (row, tokens sampled, valid tokens)
        for i in range(B):
            n, req = int(counts[i]), self._rows[i]
            if req is not None and not req.prefix_of(tokens[i], n):
                detach(req)
                self._rows[i] = req = None
            sampled = sampled_counts[i]
            if sampled and 0 < n <= tokens.shape[1]:
                active.append((i, sampled, n))
        for i, sampled, n in active:
            if self._rows[i] is None and n > sampled:
                self._rows[i] = self._take(detached, tokens[i], n, n - sampled)
        for group in detached.values():
            for req in group:
                self._end(req)

        drafts: list[list[int] | None] = [None] * B
        rows, contexts = [], []
        for i, sampled, n in active:
            req = self._rows[i]
            req = self._start(tokens[i], n, sampled) if req is None else self._update(
                req, tokens[i], n)
            self._rows[i] = req
            if req is None:
                continue
            drafted, req.draft_len = req.draft_len, 0
            self._drafted += drafted
            self._accepted += min(sampled - 1, drafted)
            drafts[i] = []
            if n >= tokens.shape[1]:
                continue
            rows.append((i, n))
            contexts.append(req.tokens[max(0, n - self.trie.match_len):n].astype(np.int64))
        self._steps += 1
        if not rows:
            return drafts
        chains, chances, lengths, matched = self.trie.draft_chains(
            contexts, self.k, request_ids=[self._rows[i].rid for i, _ in rows],
            min_prob=self.MIN_PROB, match_factor=self.MATCH_FACTOR)
        chains = chains.tolist()
        gains = []  # per row: its drafts' chances of acceptance (non-increasing)
        for (i, n), toks, probs, L, k in zip(rows, chains, chances.tolist(), lengths.tolist(),
                                             matched.tolist()):
            req = self._rows[i]
            room = min(L, tokens.shape[1] - n)
            gains.append([])
            if not L:
                continue
            cells, ratios = self._cells(k, probs[:L])
            agree = (self._agreed[cells] + self.CALIBRATION_PRIOR * ratios) / (
                self._scored[cells] + self.CALIBRATION_PRIOR)
            calibrated = np.cumprod(agree)
            req.pending.append(_Lookup(toks[:L], probs[:L], k, float(calibrated.sum())))
            scale = (req.hits + self.PRIOR) / (req.expected + self.PRIOR)
            gains[-1] = np.minimum(1.0, scale * calibrated[:room]).tolist()
        for (i, _), toks, d in zip(rows, chains, self._lengths(gains)):
            drafts[i] = toks[:d]
            self._rows[i].draft_len = d
            self._choices[f"drafts={d}"] += 1
        return drafts

    def _cells(self, context: int, chances: list[float]) -> tuple[tuple[np.ndarray, ...],
                                                                   np.ndarray]:
        """A chain's calibration cells, as an index into ``self._agreed`` (context length,
        ratio bin and position per draft), and its drafts' count ratios (each running chance
        over the one before)."""
        p = np.asarray(chances, dtype=np.float64)
        before = np.concatenate(([1.0], p[:-1]))
        ratios = np.divide(p, before, out=np.zeros_like(p), where=before > 0)
        L = len(p)
        cells = (np.full(L, min(context, self.CELLS) - 1),
                 np.searchsorted(self.RATIO_EDGES, ratios, side="right"),
                 np.minimum(np.arange(L), self.CELLS - 1))
        return cells, ratios

    def _lengths(self, gains: list[list[float]]) -> list[int]:
        """Each row's draft length for this step: the drafts of largest gain (chance of
        acceptance), D in all, with the D whose expected tokens per expected step time are the
        highest, drafting at all only where that beats plain decoding by ``MARGIN``. Since each
        row's gains do not increase along its chain, the D best are a prefix of every chain.
        Step times come from :meth:`EngineStepCosts.seconds`, or before its first fit from the
        prior (a draft token costs ``token_cost`` of one row's plain step); on an exploring
        step (:meth:`EngineStepCosts.explore`) D is halved."""
        B = len(gains)
        if not B:
            return []
        order = sorted(((g, row) for row, row_gains in enumerate(gains) for g in row_gains),
                       key=lambda item: -item[0])  # stable: ties keep each chain's order

        def cost(drafts: int) -> float:
            seconds = self.costs.seconds(B, drafts)
            return B + self.token_cost * drafts if seconds is None else max(seconds, 1e-9)

        expected, best, pick = float(B), MARGIN * B / cost(0), 0
        for drafts, (gain, _) in enumerate(order, 1):
            expected += gain
            rate = expected / cost(drafts)
            if rate > best:
                best, pick = rate, drafts
        if pick and self.costs.explore():
            pick = (pick + 1) // 2
        out = [0] * B
        for _, row in order[:pick]:
            out[row] += 1
        return out

    def _take(self, detached: dict[tuple[int, int], list[_Request]], row: np.ndarray, n: int,
              before: int) -> _Request | None:
        """The detached request whose tokens are the first ``before`` of ``row[:n]``, if any
        (removed from ``detached``)."""
        group = detached.get((before, int(row[before - 1])), [])
        for j, req in enumerate(group):
            if req.prefix_of(row, n):
                del group[j]
                return req
        return None

    def _start(self, row: np.ndarray, n: int, sampled: int) -> _Request | None:
        """A new request holding ``row[:n]`` (the prompt: all but this step's tokens), or None
        for tokens outside the vocabulary."""
        if int(row[:n].min()) < 0 or int(row[:n].max()) >= self.vocab_size:
            return None
        req = _Request(next(self._rids), row[:n], max(0, n - sampled))
        self.trie.insert(req.tokens[:n].astype(np.int64), source="request", request_id=req.rid)
        self._started += 1
        return req

    def _update(self, req: _Request, row: np.ndarray, n: int) -> _Request | None:
        """Adds ``row[req.n:n]`` to the request and scores its lookups on them; None (the
        request ended) for tokens outside the vocabulary."""
        new = row[req.n:n]
        if not len(new):
            return req
        new_tokens = new.tolist()
        if min(new_tokens) < 0 or max(new_tokens) >= self.vocab_size:
            self._end(req)
            return None
        req.extend(new)
        # the windows that reach into the new tokens (earlier ones were inserted shorter)
        start = max(0, n - (len(new) + self._window - 1))
        self.trie.insert(req.tokens[start:n].astype(np.int64), source="request",
                         request_id=req.rid)
        keep = []
        for look in req.pending:
            look.advance(new_tokens)
            if not look.final:
                keep.append(look)
                continue
            req.hits = self.DECAY * req.hits + look.matched
            req.expected = self.DECAY * req.expected + look.expected
            cells, _ = self._cells(look.context, look.chances)
            d = self.CALIBRATION_DECAY
            for j in range(min(len(look.chain), look.matched + 1)):  # the drafts that were tried
                cell = tuple(axis[j] for axis in cells)
                self._agreed[cell] = d * self._agreed[cell] + (j < look.matched)
                self._scored[cell] = d * self._scored[cell] + 1.0
        req.pending = keep
        return req

    def _end(self, req: _Request) -> None:
        """Adds the request's output, with the prompt tokens it followed, to the shared counts
        and releases its request-local counts."""
        if req.n > req.prompt_len:
            start = max(0, req.prompt_len - self.trie.match_len)
            self.trie.insert(req.tokens[start:req.n].astype(np.int64), source="shared")
        self.trie.end_request(req.rid)

    def stats(self) -> dict:
        """Steps, draft tokens proposed and accepted (as vLLM reported them back), requests
        started and live, the trie's nodes, the draft lengths chosen (``drafts=d``:
        row-steps), the engine step costs (:meth:`EngineStepCosts.stats`), and the seconds spent
        drafting (host, all steps)."""
        return {"steps": self._steps, "drafted_tokens": self._drafted,
                "accepted_tokens": self._accepted, "requests_started": self._started,
                "live_requests": sum(r is not None for r in self._rows),
                "trie_nodes": len(self.trie), "choices": dict(sorted(self._choices.items())),
                "step_costs": self.costs.stats(), "propose_seconds": self._host_s}
