"""Triton kernels of the structured feed-forward layers: the fused BlockShuffle forward and
its backward (:mod:`.block_shuffle`), the low-rank / block-dense up-projection fused with
SwiGLU (:mod:`.swiglu_up`) and the decoding GEMVs of every structure and of a merged dense
weight (:mod:`.decode`)."""

from .block_shuffle import block_shuffle_backward_triton, block_shuffle_triton
from .decode import block_dense_decode_triton, block_shuffle_decode_triton, dense_decode_triton
from .swiglu_up import swiglu_up_triton

__all__ = ["block_dense_decode_triton", "block_shuffle_backward_triton",
           "block_shuffle_decode_triton", "block_shuffle_triton", "dense_decode_triton",
           "swiglu_up_triton"]
