"""C++ (cpu/) and CUDA (cuda/) kernel sources, compiled on first use by sparse_ofa/_ext.py.

This file only makes the folder installable as package data (`sparse_ofa.csrc`)."""
