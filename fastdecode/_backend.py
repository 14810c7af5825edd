"""The one dispatch mechanism: a registry ``{op: {backend: implementation}}`` and the rules that
pick an implementation for a call.

Backends, fastest first on their device:
  ``cuda``   the extension's CUDA kernels (CUDA tensors; needs a CUDA build and a GPU),
  ``triton`` Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``),
  ``cpu``    the extension's C++ kernels (CPU tensors),
  ``torch``  the plain PyTorch reference (any device; every op has one).

Selection, per call: an active :func:`use_backend` context, else the ``FASTDECODE_BACKEND``
environment variable, else the fastest backend that runs on the tensors' device. A backend
that is forced but cannot run raises :class:`BackendUnavailableError`. The token trie of
trie-based lookahead decoding (``_C.Trie``, behind :class:`fastdecode.decoding.TrieCache`) is a
host data structure, not a dispatched op: it is outside this registry, and neither
:func:`use_backend` nor ``FASTDECODE_BACKEND`` affects it.
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
# The active use_backend() blocks, innermost last.
_OVERRIDES: contextvars.ContextVar[tuple[_Override, ...]] = contextvars.ContextVar(
    "fastdecode_backend", default=()
)


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; found {name!r}")
    return name


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``op`` for ``backend``."""
    _check_name(backend, "backend")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = fn
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


def _forced(op: str) -> tuple[str, str] | None:
    """The forced backend for ``op`` and where the force came from, if any."""
    for ctx in reversed(_OVERRIDES.get()):
        if ctx.ops is None or op in ctx.ops:
            return ctx.backend, "use_backend()"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check_name(env, ENV_VAR), ENV_VAR
    return None


def select(op: str, device: torch.device) -> tuple[str, Callable]:
    """The backend name and implementation that run ``op`` on ``device`` now."""
    impls = _REGISTRY[op]
    forced = _forced(op)
    if forced is not None:
        name, source = forced
        if name not in impls:
            raise BackendUnavailableError(
                f"{op} has no {name!r} backend (requested by {source}); "
                f"it has: {', '.join(b for b in BACKENDS if b in impls)}"
            )
        reason = _why_not(name, device.type)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {name!r} of {op} cannot run (requested by {source}): {reason}"
            )
        return name, impls[name]
    for name in _PREFERENCE.get(device.type, ("torch",)):
        if name in impls and _why_not(name, device.type) is None:
            return name, impls[name]
    return "torch", impls["torch"]


def run(op: str, device: torch.device, *args: object) -> object:
    """Calls the selected implementation of ``op`` with ``args``."""
    return select(op, device)[1](*args)


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
    task). Blocks nest: the innermost block that covers an op decides. An op that lacks the backend, or cannot run it on its tensors' device,
    raises :class:`BackendUnavailableError`.
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
    """For each backend ``op`` implements: whether it can run on this machine (on any device)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        b: any(_why_not(b, d) is None for d in devices)
        for b in BACKENDS
        if b in _REGISTRY[op]
    }


def ops() -> list[str]:
    """Every registered op, sorted."""
    return sorted(_REGISTRY)
