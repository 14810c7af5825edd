"""``fastdecode.info()``: what this installation holds and can run."""

from __future__ import annotations

import torch

from fastdecode import _backend, _native
from fastdecode._version import __version__, installed_version


def _triton_version() -> str | None:
    """The installed triton's version, or None when triton is not importable (by the test the
    ``triton`` backends use, so this version and the table's triton column agree)."""
    return installed_version("triton") if _backend._triton_installed() else None


def info() -> dict:
    """Versions, the build and, for every op, which backends run on this machine.

    Returns a dict with keys ``version``, ``torch``, ``triton`` (None when absent),
    ``native_built``, ``cuda_built``, ``cuda_archs`` (e.g. ``["80", "90"]``), ``gpu`` (the
    current CUDA device's name, or None) and ``ops``: ``{op: {backend: runs_here}}`` over the
    backends each op implements.
    """
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "version": __version__,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "native_built": _native.cpu_built(),
        "cuda_built": _native.cuda_built(),
        "cuda_archs": _native.cuda_archs(),
        "gpu": gpu,
        "ops": {op: _backend.available(op) for op in _backend.ops()},
    }


def format_info(facts: dict) -> str:
    """``info()`` as a plain-text table."""
    rows = [(k, "-" if v is None else ", ".join(v) if isinstance(v, list) else str(v))
            for k, v in facts.items() if k != "ops"]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    names = list(_backend.BACKENDS)
    op_width = max([len("op")] + [len(op) for op in facts["ops"]])
    lines += ["", f"{'op':<{op_width}}  " + "  ".join(f"{b:<6}" for b in names)]
    for op, backends in facts["ops"].items():
        cells = ["yes" if backends.get(b) else ("no" if b in backends else "") for b in names]
        lines.append(f"{op:<{op_width}}  " + "  ".join(f"{c:<6}" for c in cells))
    lines.append("(yes: runs here; no: implemented but cannot run here; blank: not implemented)")
    if facts["triton"] is None and any("triton" in b for b in facts["ops"].values()):
        lines.append("triton is not installed, so every triton backend reads no: "
                     "pip install triton to enable them")
    return "\n".join(lines)
