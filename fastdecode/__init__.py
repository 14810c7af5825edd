"""fastdecode: hand-written CUDA and Triton kernels for fast, exact LLM decoding and attention.

``fastdecode.ops`` holds the ops; ``use_backend`` and ``FASTDECODE_BACKEND`` pick their
implementations; ``info()`` tells what this installation can run; ``generate`` decodes with
transformers causal LMs (imported on first use, so ``import fastdecode`` stays light).
"""

from fastdecode import ops
from fastdecode._backend import BACKENDS, BackendUnavailableError, use_backend
from fastdecode._info import info
from fastdecode._version import __version__

__all__ = ["BACKENDS", "BackendUnavailableError", "__version__", "generate", "info", "ops",
           "use_backend"]


def __getattr__(name: str):
    if name == "generate":
        from fastdecode.decoding.generate import generate

        return generate
    raise AttributeError(f"module 'fastdecode' has no attribute {name!r}")
