"""Triton kernels of fastdino: one file per op, kernels plus a launcher."""
