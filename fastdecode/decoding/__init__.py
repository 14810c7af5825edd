"""Decoding strategies built on the ops: the n-gram pool of Jacobi lookahead decoding."""

from fastdecode.decoding.ngram_pool import NGramPool

__all__ = ["NGramPool"]
