"""CASTLE attention (causal attention with lookahead keys, arXiv:2509.07301) and its UQ-KV cache.

Every position s carries a causal key ``k^C_s`` and a lookahead key that grows as tokens arrive:
with t tokens present, ``u_s = sum_{s < r <= t} sigmoid(c q^U_s . k^U_r) v^U_r`` (CASTLE-SWL, a
window W, keeps only ``r <= s + W``). Query t scores key s as
``c q^C_t . k^C_s - SiLU(c q^C_t . u_s)``, takes one causal softmax and averages ``v^C``.
``c`` is ``scale``, default ``1/sqrt(D)``. Tensors are ``[B, H, L, D]``; the state (lookahead
keys, softmax statistics) is fp32 (fp64 for fp64 inputs).

The public functions, exported here and from :mod:`fastdecode.ops`:

  * :func:`castle_attention` (:mod:`.attention`), the parallel (training) form with autograd;
  * :class:`CastleCache` with :func:`castle_decode` and :func:`castle_prefill` (:mod:`.cache`).

Behind them: :mod:`.op` holds the ``torch.library`` custom ops, their fake implementations, the
autograd of the parallel form and the backend registrations; :mod:`.blocked` the ``torch``
backend of the parallel form (blocked forward and hand-written backward) and :mod:`.chunked`
the ``torch`` backend of the cache's steps, while the ``triton`` backends live in
``fastdecode.triton_kernels.castle``; :mod:`.contract` the dtypes, the window spelling and the
argument checks; :mod:`.reference` the test oracles (the dense Theorem-1 form with its chain
rule, and the step-by-step definition), registered as no backend.
"""

from fastdecode.ops.castle.attention import castle_attention
from fastdecode.ops.castle.cache import CastleCache, castle_decode, castle_prefill

__all__ = ["CastleCache", "castle_attention", "castle_decode", "castle_prefill"]
