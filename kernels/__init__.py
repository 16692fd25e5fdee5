"""Triton kernels and their launchers (installed as ``fused_mtl.kernels``; imports triton)."""
