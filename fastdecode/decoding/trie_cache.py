"""The token trie of trie-based lookahead decoding (Ant Group's "Lookahead", KDD 2024): a bounded,
thread-safe store of the n-grams seen in prompts and generated outputs, from which every decoding
step retrieves a draft *tree* for :func:`fastdecode.ops.verify_tree`.

The trie itself is C++ (``csrc/trie/``); this class validates arguments, converts token
sequences and wraps the results in tensors. Every native call releases the GIL.
"""

from __future__ import annotations

import operator
import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence, Union

import torch

from fastdecode import _native
from fastdecode._backend import BackendUnavailableError
from fastdecode.ops import _validate

_MODES = {"hier": 0, "parallel": 1}
_SOURCES = ("request", "shared")
_OLD_SOURCES = {"prompt": "request", "output": "shared"}  # the names before 0.2, deprecated
_NO_REQUEST = -1  # the native id of request_id=None (kNoRequest in csrc/trie/trie.h)

TokensLike = Union[torch.Tensor, Sequence[int], "numpy.ndarray"]
"""A 1-D int64 torch tensor, numpy array or list of ints."""


def _native_trie():
    if not _native.cpu_built():
        raise BackendUnavailableError(
            "TrieCache needs the native extension fastdecode._C, which is not built "
            "(pip install -e . builds it)")
    return _native._C


def _tokens(name: str, x: object) -> torch.Tensor:
    """``x`` as a contiguous 1-D int64 CPU tensor (a tensor on another device is copied)."""
    if (type(x) is torch.Tensor and x.dtype == torch.int64 and x.dim() == 1 and x.is_cpu
            and x.is_contiguous()):
        return x  # the common case, first
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.int64:
            raise TypeError(f"{name} must have dtype torch.int64, found {x.dtype}")
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D, found shape {tuple(x.shape)}")
        if x.device.type != "cpu":
            x = x.cpu()
        return x.contiguous()
    if type(x).__module__ == "numpy" and type(x).__name__ == "ndarray":
        import numpy as np

        if x.dtype != np.int64:
            raise TypeError(f"{name} must have dtype int64, found numpy {x.dtype}")
        if x.ndim != 1:
            raise ValueError(f"{name} must be 1-D, found shape {x.shape}")
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, (list, tuple)):
        values = []
        for t in x:
            try:
                if isinstance(t, bool):
                    raise TypeError
                values.append(operator.index(t))  # ints and numpy integer scalars
            except TypeError:
                raise TypeError(f"{name} must hold ints, found {type(t).__name__}") from None
        try:
            return torch.tensor(values, dtype=torch.int64)
        except (RuntimeError, OverflowError, ValueError):
            raise ValueError(f"{name} holds a value that does not fit in int64") from None
    raise TypeError(f"{name} must be a 1-D int64 torch.Tensor, numpy array or list of ints, "
                    f"found {type(x).__name__}")


def _request(request_id: object) -> int:
    """The native request id: ``None`` is the default request, else an int >= 0."""
    if request_id is None:
        return _NO_REQUEST
    return _validate.integer("request_id", request_id, 0, 2**63 - 1)


def _choice(name: str, value: object, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {allowed}, found {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
    return value


def _source(value: object) -> str:
    """``source``, checked; an earlier name is mapped to its new one with a DeprecationWarning."""
    if isinstance(value, str) and value in _OLD_SOURCES:
        warnings.warn(f"source={value!r} is deprecated; use source={_OLD_SOURCES[value]!r}",
                      DeprecationWarning, stacklevel=3)
        return _OLD_SOURCES[value]
    return _choice("source", value, _SOURCES)


class TrieCache:
    """Token trie of trie-based lookahead decoding.

    **What is stored.** ``insert(tokens)`` inserts, for every start position ``i``, the window
    ``tokens[i : i + match_len + branch_length]`` (shorter at the end, at least 2 tokens) as a
    path below a virtual root, so the node at path ``p`` counts how many inserted windows began
    with ``p``. Insertions stop at the first token of ``eos_token_ids``. Counts come from two
    sources:

    * ``source="shared"``: global counts shared by every request (finished outputs; warming the
      trie with a corpus), so repeated workloads warm up;
    * ``source="request"``: counts of one request (``request_id``: its prompt and its output so
      far), visible only to retrievals of that request and released by :meth:`end_request`.
      Nodes holding a live request count are never evicted.

    (``"prompt"`` and ``"output"``, the earlier names of the two sources, still work and warn.)

    **Ranking.** A request ranks a node by its own request count first, then by the shared
    count (lexicographic: a weighted sum ``(1 - w) * request + w * shared`` with a tiny ``w``).
    Nodes with neither count for the request (e.g. another request's prompt) are invisible to it.

    **Retrieval.** :meth:`retrieve` matches the last ``k`` context tokens as a path below the
    root, for ``k`` from ``match_len`` down to 1, and builds a draft tree below the matched node
    (node 0 = the last context token): ``mode="hier"`` keeps the ``max_nodes`` best-ranked nodes
    of the matched subtree (root included, at most ``max_depth`` below the root; a best-first
    expansion, so every kept node's parent is kept) in depth-first order, best child first;
    ``mode="parallel"`` lays out disjoint chains, one per child of the matched node in rank
    order, each following the best child down to ``max_depth``, cut at ``max_nodes``. A shorter
    context is tried while the tree has fewer than ``min(max_depth, max_nodes - 1)`` drafts; the
    largest tree found wins (the longer context on ties). Siblings always carry distinct tokens,
    in both modes (sampling-exact verification needs it, see :func:`fastdecode.ops.verify_tree`):
    rather than repeating shared prefixes so that every root-to-leaf path is its own branch,
    ``"parallel"`` keeps one chain per first token.

    **Memory.** At most ``max_nodes_total`` nodes exist at any time. Eviction is least recently
    used (rather than halving every count from time to time: it bounds memory exactly, costs
    O(1) per evicted node and needs no periodic pass), of leaves: every insertion refreshes its
    windows' paths (deepest node first, so a parent is always more recent than its children)
    and a window that needs room first evicts the least recently refreshed leaves. When live
    request counts fill the budget, windows are cut short (``stats()["truncated_windows"]``); :meth:`end_request` unpins a request's nodes and
    deletes those left without counts. Counts saturate at 2^32 - 1 (no decay).

    **Threads.** Thread-safe: retrievals share a reader-writer lock, insertions and releases take
    it exclusively, and the GIL is released in every native call.

    **Persistence.** :meth:`save` writes a versioned, checksummed binary image (nodes, output
    counts, live requests' request counts, recency order); :meth:`load` validates it completely
    and raises ``ValueError`` for any truncated, corrupted or inconsistent file.

    Args:
        vocab_size: tokens lie in ``[0, vocab_size)`` (at most 2^31 - 1).
        decoding_length: :meth:`retrieve`'s default ``max_nodes`` (root included), <= 2048.
        branch_length: :meth:`retrieve`'s default ``max_depth``; windows hold
            ``match_len + branch_length`` tokens.
        match_len: the most trailing context tokens matched.
        max_nodes_total: the node budget (default 2^20).
        eos_token_ids: insertions are cut at the first of these tokens.
    """

    def __init__(self, vocab_size: int, *, decoding_length: int = 64, branch_length: int = 12,
                 match_len: int = 2, max_nodes_total: int = 1 << 20,
                 eos_token_ids: Iterable[int] = ()) -> None:
        C = _native_trie()
        _validate.integer("vocab_size", vocab_size, 1, 2**31 - 1)
        _validate.integer("decoding_length", decoding_length, 1, C.trie_max_tree_nodes)
        _validate.integer("branch_length", branch_length, 1, C.trie_max_branch_length)
        _validate.integer("match_len", match_len, 1, C.trie_max_match_len)
        _validate.integer("max_nodes_total", max_nodes_total, 1, C.trie_max_nodes_total)
        eos = [_validate.integer("eos token", t, 0, vocab_size - 1) for t in eos_token_ids]
        self._init(C.Trie(vocab_size, match_len, branch_length, decoding_length,
                          max_nodes_total, eos))

    def _init(self, native: object) -> None:
        self._trie = native
        self._decoding_length = native.decoding_length  # retrieval defaults, read per call
        self._branch_length = native.branch_length

    @classmethod
    def _wrap(cls, native: object) -> TrieCache:
        self = cls.__new__(cls)
        self._init(native)
        return self

    # ---- settings --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._trie.vocab_size

    @property
    def decoding_length(self) -> int:
        return self._decoding_length

    @property
    def branch_length(self) -> int:
        return self._branch_length

    @property
    def match_len(self) -> int:
        return self._trie.match_len

    @property
    def max_nodes_total(self) -> int:
        return self._trie.max_nodes_total

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self._trie.eos)

    # ---- updates ---------------------------------------------------------------------------

    def insert(self, tokens: TokensLike, source: str = "request",
               request_id: int | None = None) -> None:
        """Inserts the windows of ``tokens`` (see the class doc).

        Args:
            tokens: 1-D int64 tensor, numpy array or list of ints, all in ``[0, vocab_size)``
                (else ValueError, and nothing is inserted).
            source: ``"request"`` (counts of ``request_id``) or ``"shared"`` (global counts;
                ``request_id`` is not used).
            request_id: an int >= 0, or None for the default request.
        """
        source = _source(source)
        rid = _request(request_id)
        t = _tokens("tokens", tokens)
        self._trie.insert(t.data_ptr(), t.numel(), source == "request", rid)

    def end_request(self, request_id: int | None = None) -> int:
        """Releases a request's own counts (nodes left without counts are deleted). Returns
        the number of nodes it held; 0 for an unknown request."""
        return self._trie.end_request(_request(request_id))

    def clear(self) -> None:
        """Removes every node and request; the settings are kept."""
        self._trie.clear()

    # ---- retrieval -------------------------------------------------------------------------

    def _limits(self, max_nodes: int | None, max_depth: int | None, mode: str
                ) -> tuple[int, int, int]:
        K = self._decoding_length if max_nodes is None else _validate.integer(
            "max_nodes", max_nodes, 1, _native._C.trie_max_tree_nodes)
        D = self._branch_length if max_depth is None else _validate.integer(
            "max_depth", max_depth, 0)
        m = _MODES.get(mode) if type(mode) is str else None
        return K, D, _MODES[_choice("mode", mode, _MODES)] if m is None else m

    def retrieve(self, context_tokens: TokensLike, max_nodes: int | None = None,
                 max_depth: int | None = None, mode: str = "hier",
                 request_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A draft tree for the next step after ``context_tokens``.

        Args:
            context_tokens: 1-D int64 tokens, at least one (the last ``match_len`` must lie in
                the vocabulary).
            max_nodes: node budget including the root (default ``decoding_length``), in
                ``[1, 2048]``.
            max_depth: depth limit below the root (default ``branch_length``), >= 0.
            mode: ``"hier"`` or ``"parallel"`` (see the class doc).
            request_id: whose request counts rank the nodes (with the shared counts).

        Returns:
            ``(draft_tokens, parents)``: int64 CPU tensors ``[T]``, ``1 <= T <= max_nodes``, in
            :func:`fastdecode.ops.verify_tree`'s format: ``draft_tokens[0] ==
            context_tokens[-1]``, ``parents[0] == -1`` and ``0 <= parents[j] < j``.
        """
        K, D, m = self._limits(max_nodes, max_depth, mode)
        rid = _request(request_id)
        ctx = _tokens("context_tokens", context_tokens)
        tokens = torch.empty(K, dtype=torch.int64)
        parents = torch.empty(K, dtype=torch.int64)
        T = self._trie.retrieve(ctx.data_ptr(), ctx.numel(), K, D, m, rid, tokens.data_ptr(),
                                parents.data_ptr())
        if T != K:  # in place: cheaper than slicing
            tokens.resize_(T)
            parents.resize_(T)
        return tokens, parents

    def retrieve_batch(self, contexts: Sequence[TokensLike], max_nodes: int | None = None,
                       max_depth: int | None = None, mode: str = "hier",
                       request_ids: Sequence[int | None] | None = None,
                       pad_to_max_nodes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`retrieve` for B contexts under one lock.

        Args:
            contexts: B 1-D token sequences.
            request_ids: one per context (default: None for all).
            pad_to_max_nodes: pad to ``T = max_nodes`` (a fixed shape, e.g. for CUDA graphs)
                rather than to the largest tree.

        Returns:
            ``(tokens, parents)``: int64 CPU tensors ``[B, T]``; row b holds its tree, then
            token 0 and parent -2 (verify_tree's padding) up to the common ``T``, the largest
            tree's size (1 when B == 0).
        """
        K, D, m = self._limits(max_nodes, max_depth, mode)
        rows, rids = self._batch(contexts, request_ids)
        B = len(rows)
        tokens = torch.empty(B, K, dtype=torch.int64)
        parents = torch.empty(B, K, dtype=torch.int64)
        # The native call compacts the rows to [B, T] in place: no torch op runs here (a torch
        # copy could wake its thread pool, which then spins against the caller).
        T = self._trie.retrieve_batch([r.data_ptr() for r in rows], [r.numel() for r in rows],
                                      K, D, m, rids, tokens.data_ptr(), parents.data_ptr(),
                                      bool(pad_to_max_nodes))
        if T != K:
            tokens.resize_(B, T)
            parents.resize_(B, T)
        return tokens, parents

    def draft_chains(self, contexts: Sequence[TokensLike], max_len: int,
                     request_ids: Sequence[int | None] | None = None, min_prob: float = 0.1,
                     match_factor: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each context's likeliest continuation as one chain, with the chance of each draft
        under the counts, for engines that verify chains (B contexts under one lock).

        For each context length ``k`` from ``match_len`` down to 1 whose path the request sees,
        and each source (the request's own counts, then the shared counts), a chain follows
        the child of largest count in that source while the running product of
        ``count(child) / count(parent)`` stays at least ``min_prob``, for at most
        ``min(max_len, ceil(k * match_factor))`` tokens (``match_factor <= 0``: ``max_len``).
        Its score is the sum of those running products; each row gets its best-scored chain
        (ties: the longer context, then the request's counts).

        Args:
            contexts: B 1-D token sequences (the last ``match_len`` tokens are matched).
            max_len: the most drafts per chain, in ``[1, 1024]``.
            request_ids: one per context (default: None for all).
            min_prob: the least running product kept, in ``[0, 1]``.
            match_factor: caps a chain at this many drafts per matched context token (> 0), or
                not (<= 0).

        Returns:
            ``(tokens, probs, lengths, matched)``: CPU tensors ``tokens`` int64 ``[B, max_len]``
            (row b's chain in its first ``lengths[b]`` entries, then 0), ``probs`` float64
            ``[B, max_len]`` (the running products, non-increasing, then 0), ``lengths`` and
            ``matched`` int64 ``[B]`` (the chain's context length; 0 where no chain).
        """
        L = _validate.integer("max_len", max_len, 1, _native._C.trie_max_branch_length)
        if isinstance(min_prob, bool) or not isinstance(min_prob, (int, float)) or not (
                0.0 <= min_prob <= 1.0):
            raise ValueError(f"min_prob must be a number in [0, 1], found {min_prob!r}")
        if isinstance(match_factor, bool) or not isinstance(match_factor, (int, float)) or (
                match_factor != match_factor):
            raise ValueError(f"match_factor must be a number, found {match_factor!r}")
        rows, rids = self._batch(contexts, request_ids)
        B = len(rows)
        tokens = torch.empty(B, L, dtype=torch.int64)
        probs = torch.empty(B, L, dtype=torch.float64)
        lengths = torch.empty(B, dtype=torch.int64)
        matched = torch.empty(B, dtype=torch.int64)
        self._trie.draft_chains([r.data_ptr() for r in rows], [r.numel() for r in rows], rids, L,
                                float(min_prob), float(match_factor), tokens.data_ptr(),
                                probs.data_ptr(), lengths.data_ptr(), matched.data_ptr())
        return tokens, probs, lengths, matched

    def _batch(self, contexts: Sequence[TokensLike], request_ids: Sequence[int | None] | None
               ) -> tuple[list[torch.Tensor], list[int]]:
        """The contexts of a batch call as int64 tensors, and their native request ids."""
        if isinstance(contexts, (torch.Tensor, str, bytes)) or not isinstance(contexts, Sequence):
            raise TypeError("contexts must be a list of 1-D token sequences, found "
                            f"{type(contexts).__name__}")
        B = len(contexts)
        if request_ids is None:
            rids = [_request(None)] * B
        else:
            if len(request_ids) != B:
                raise ValueError(f"request_ids has {len(request_ids)} entries for {B} contexts")
            rids = [_request(r) for r in request_ids]
        return [_tokens(f"contexts[{b}]", c) for b, c in enumerate(contexts)], rids

    # ---- inspection ------------------------------------------------------------------------

    def count(self, path: TokensLike, source: str = "shared",
              request_id: int | None = None) -> int:
        """The count of the node at ``path`` below the root (how many windows began with
        ``path``): the shared count, or ``request_id``'s own count; 0 if absent."""
        source = _source(source)
        rid = _request(request_id)
        t = _tokens("path", path)
        return self._trie.count(t.data_ptr(), t.numel(), source == "request", rid)

    @property
    def num_nodes(self) -> int:
        """Live nodes (the virtual root not counted); never above ``max_nodes_total``."""
        return self._trie.stats()["nodes"]

    def __len__(self) -> int:
        return self.num_nodes

    def stats(self) -> dict[str, int]:
        """``nodes``, ``pinned`` (holding a live request count), ``requests``, ``evictions``,
        ``truncated_windows``, ``windows`` (inserted), ``bytes`` (approximate heap size)."""
        return self._trie.stats()

    def check(self) -> None:
        """Checks every internal invariant (for tests); raises RuntimeError if one is broken."""
        self._trie.check()

    def __repr__(self) -> str:
        return (f"TrieCache(vocab_size={self.vocab_size}, decoding_length="
                f"{self.decoding_length}, branch_length={self.branch_length}, match_len="
                f"{self.match_len}, max_nodes_total={self.max_nodes_total}, nodes="
                f"{self.num_nodes})")

    # ---- persistence -----------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The trie's binary image (see :meth:`save`)."""
        return self._trie.serialize()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> TrieCache:
        """A trie from :meth:`to_bytes`'s image; ValueError if it is damaged in any way."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, found {type(data).__name__}")
        return cls._wrap(_native_trie().Trie.deserialize(bytes(data)))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the trie to ``path`` (through a temporary file, then an atomic rename):
        settings, nodes with their output counts, the live requests' request counts and the
        recency order. Format: magic ``FDTRIE\\x1a\\n``, version 1, a 64-byte header, the
        payload and a 64-bit checksum (``csrc/trie/trie_io.cpp``)."""
        path = Path(path)
        data = self.to_bytes()
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrieCache:
        """A trie saved by :meth:`save`, with its saved settings. Raises ValueError for a file
        that is truncated, corrupted, of another version or not a trie file (OSError if it
        cannot be read)."""
        return cls.from_bytes(Path(path).read_bytes())
