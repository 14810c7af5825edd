"""The one dispatch mechanism: a registry ``{op: {backend: implementation}}`` and the rules that
pick an implementation for a call.

Backends, fastest first on their device:
  ``cuda``   the extension's CUDA kernels (CUDA tensors; needs a CUDA build and a GPU),
  ``triton`` Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``),
  ``cpu``    the extension's C++ kernels (CPU tensors),
  ``torch``  the plain PyTorch reference (any device, any dtype the op takes; every op has one).

Selection, per call: an active :func:`use_backend` context, else the ``FASTDECODE_BACKEND``
environment variable, else the fastest backend that runs on the tensors' device and takes
their dtypes (an implementation registered with ``dtypes=`` takes only those: the ``triton``
structured ops take no float64, so float64 calls such as gradcheck run on ``torch``). A
backend that is forced but cannot run the call (device, build or dtype) raises
:class:`BackendUnavailableError` with the reason; no forced backend silently runs another.

Choices made outside this registry, which neither :func:`use_backend` nor
``FASTDECODE_BACKEND`` makes:

* :class:`fastdecode.nn.StructuredLinear` (LowRank, BlockDense, BlockShuffle) picks a product
  per call (:meth:`~fastdecode.nn.StructuredLinear.path`): ``"structured"`` (the factors)
  when the call needs a gradient; else ``"merged"`` (the dense copy kept by ``merge()``) when
  merged and the call has at most ``merge_threshold`` tokens; else ``"decode"`` (the decoding
  ops) on CUDA for 1 to ``MAX_DECODE_TOKENS`` (16) tokens; else ``"structured"``. There is no
  switch: ``merge()``/``unmerge()``, ``merge_threshold`` (0 keeps every non-empty call off the
  merged path) and grad mode steer it, and the CPU never takes ``"decode"``. The ops a path
  calls (``block_shuffle``, ``swiglu_up``, ``dense_decode`` on CUDA, the ``*_decode`` ops) are
  dispatched here; the rest (LowRank's and BlockDense's structured products, the merged weight
  off CUDA or past 16 tokens) is plain ``F.linear``/``einsum``.
  :class:`fastdecode.nn.StructuredFFN` uses the fused ``swiglu_up`` op wherever its bias-free
  LowRank/BlockDense ``fc1`` would take ``"structured"``.
* ``FASTDECODE_CPU_ISA`` (``avx512`` | ``avx2`` | ``scalar``) picks the instruction-set path
  inside the ``cpu`` backend of ``small_linear`` (default: the fastest this CPU supports). The
  extension reads it once, at the first call; a name it does not know, or a path this CPU or
  build lacks, raises ``ValueError`` there. :func:`fastdecode.ops.linear.set_small_linear_isa`
  forces a path at run time, :func:`~fastdecode.ops.linear.small_linear_isa` says which runs.
* The token trie of trie-based lookahead decoding (``_C.Trie``, behind
  :class:`fastdecode.decoding.TrieCache`) is a host data structure, not a dispatched op: it
  always runs the extension's C++ code.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from fastdecode import _native

BACKENDS = ("cuda", "triton", "cpu", "torch")
_PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
ENV_VAR = "FASTDECODE_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was requested that the op lacks or that cannot run here."""


@dataclass(frozen=True)
class _Override:
    backend: str
    ops: frozenset[str] | None  # None: every op


_REGISTRY: dict[str, dict[str, Callable]] = {}
# (op, backend) -> the floating-point dtypes that implementation takes; absent: every dtype.
_DTYPES: dict[tuple[str, str], frozenset[torch.dtype]] = {}
# The active use_backend() blocks, innermost last.
_OVERRIDES: contextvars.ContextVar[tuple[_Override, ...]] = contextvars.ContextVar(
    "fastdecode_backend", default=()
)


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; found {name!r}")
    return name


def register(op: str, backend: str, *, dtypes: Iterable[torch.dtype] | None = None
             ) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``op`` for ``backend``.

    ``dtypes``: the floating-point dtypes ``fn`` takes (None: all of them). For a call with a
    floating-point tensor argument of another dtype, the automatic choice passes over this
    backend and forcing it raises :class:`BackendUnavailableError`.
    """
    _check_name(backend, "backend")
    allowed = None if dtypes is None else frozenset(dtypes)

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = fn
        if allowed is None:
            _DTYPES.pop((op, backend), None)
        else:
            _DTYPES[(op, backend)] = allowed
        return fn

    return deco


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _why_not(backend: str, device_type: str) -> str | None:
    """Why ``backend`` cannot run on ``device_type`` here, or None when it can."""
    if backend == "torch":
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"it runs on CUDA tensors, not {device_type}"
        return None if _native.cuda_built() else "the extension was built without CUDA"
    if backend == "cpu":
        if device_type != "cpu":
            return f"it runs on CPU tensors, not {device_type}"
        return None if _native.cpu_built() else "the native extension fastdecode._C is not built"
    # triton
    if not _triton_installed():
        return "triton is not installed"
    if device_type == "cuda" or (device_type == "cpu" and _interpreting()):
        return None
    return f"it runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1, not {device_type}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _why_not_dtypes(op: str, backend: str, args: tuple) -> str | None:
    """Why ``backend``'s implementation of ``op`` refuses the dtypes of ``args`` (a call's
    arguments), or None when it takes them."""
    allowed = _DTYPES.get((op, backend))
    if allowed is None:
        return None
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype not in allowed:
            takes = ", ".join(sorted(_dtype_name(d) for d in allowed))
            return f"it does not take {_dtype_name(a.dtype)} tensors (it takes {takes})"
    return None


def _forced(op: str) -> tuple[str, str] | None:
    """The forced backend for ``op`` and where the force came from, if any."""
    for ctx in reversed(_OVERRIDES.get()):
        if ctx.ops is None or op in ctx.ops:
            return ctx.backend, "use_backend()"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check_name(env, ENV_VAR), ENV_VAR
    return None


def select(op: str, device: torch.device, args: tuple = ()) -> tuple[str, Callable]:
    """The backend name and implementation that run ``op`` on ``device`` now, for a call
    with arguments ``args`` (their dtypes matter to backends registered with ``dtypes``)."""
    impls = _REGISTRY[op]
    forced = _forced(op)
    if forced is not None:
        name, source = forced
        if name not in impls:
            raise BackendUnavailableError(
                f"{op} has no {name!r} backend (requested by {source}); "
                f"it has: {', '.join(b for b in BACKENDS if b in impls)}"
            )
        reason = _why_not(name, device.type) or _why_not_dtypes(op, name, args)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {name!r} of {op} cannot run (requested by {source}): {reason}"
            )
        return name, impls[name]
    for name in _PREFERENCE.get(device.type, ("torch",)):
        if (name in impls and _why_not(name, device.type) is None
                and _why_not_dtypes(op, name, args) is None):
            return name, impls[name]
    return "torch", impls["torch"]


def run(op: str, device: torch.device, *args: object) -> object:
    """Calls the selected implementation of ``op`` with ``args``."""
    return select(op, device, args)[1](*args)


def _plain(args: tuple) -> bool:
    """Whether every tensor in ``args`` (lists included) is a plain eager torch.Tensor or an
    ``nn.Parameter`` (a module's weight: no tensor-subclass behaviour of its own)."""
    for a in args:
        if isinstance(a, (list, tuple)):
            if not _plain(tuple(a)):
                return False
        elif isinstance(a, torch.Tensor) and type(a) not in _PLAIN_TYPES:
            return False
    return True


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def dispatch(op: str, custom_op: Callable, device: torch.device, *args: object) -> object:
    """Runs ``op``: through its ``torch.library`` custom op while torch.compile traces or when a
    tensor subclass (fake, functional) is involved, else straight to the selected backend,
    which skips the custom-op dispatcher's cost (about 10 µs a call) in eager mode."""
    if torch.compiler.is_compiling() or not _plain(args):
        return custom_op(*args)
    return run(op, device, *args)


@contextlib.contextmanager
def use_backend(name: str, ops: Iterable[str] | None = None) -> Iterator[None]:
    """Forces backend ``name`` inside the ``with`` block, for every op or only for ``ops``.

    It takes precedence over ``FASTDECODE_BACKEND`` and is local to the thread (and asyncio
    task). Blocks nest: the innermost block that covers an op decides. An op that lacks the
    backend, or cannot run it on its tensors' device or dtypes, raises
    :class:`BackendUnavailableError`.
    """
    _check_name(name, "use_backend(name)")
    if ops is not None:
        ops = frozenset([ops] if isinstance(ops, str) else ops)
        unknown = sorted(ops - _REGISTRY.keys())
        if unknown:
            raise ValueError(f"use_backend(ops) names unknown ops {unknown}; known: {sorted(_REGISTRY)}")
    token = _OVERRIDES.set(_OVERRIDES.get() + (_Override(name, ops),))
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def available(op: str) -> dict[str, bool]:
    """For each backend ``op`` implements: whether it can run on this machine (on any device,
    for some dtype)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        b: any(_why_not(b, d) is None for d in devices)
        for b in BACKENDS
        if b in _REGISTRY[op]
    }


def ops() -> list[str]:
    """Every registered op, sorted."""
    return sorted(_REGISTRY)
