"""fastdecode: hand-written CUDA and Triton kernels for fast, exact LLM decoding and attention.

``fastdecode.ops`` holds the ops; ``use_backend`` and ``FASTDECODE_BACKEND`` pick their
implementations; ``info()`` tells what this installation can run.
"""

from fastdecode import ops
from fastdecode._backend import BACKENDS, BackendUnavailableError, use_backend
from fastdecode._info import info
from fastdecode._version import __version__

__all__ = ["BACKENDS", "BackendUnavailableError", "__version__", "info", "ops", "use_backend"]
