"""Triton kernels of CASTLE attention: the blocked parallel forward and column-sweep backward
(:mod:`.parallel`) and the fused decoding step over the UQ-KV cache (:mod:`.decode`)."""
