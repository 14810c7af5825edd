"""Decoding strategies built on the ops: the n-gram pool of Jacobi lookahead decoding."""

from fastdecode.decoding.ngram_pool import NGramPool
from fastdecode.decoding.trie_cache import TrieCache

__all__ = ["NGramPool"]
__all__ += ["TrieCache"]
