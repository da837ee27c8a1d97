"""Triton kernels of fastdino, installed as ``fastdino.kernels``: one file per op, kernels plus a launcher."""
