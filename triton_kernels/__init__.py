"""Triton kernels of fastdecode, installed as ``fastdecode.triton_kernels``.

One subpackage per feature; each kernel's plain-torch reference lives beside its public op in
``fastdecode.ops``. Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""
