"""Triton kernels of tree decoding steps: attention of a draft tree's tokens over a row's cached
prefix and over each other through the packed tree mask (:mod:`.attention`)."""
