"""Triton kernels for sparse-INT8 matmuls, installed as `sparse_ofa.kernels`."""
