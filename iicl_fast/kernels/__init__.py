"""Triton kernels of iicl_fast, shipped as the subpackage `iicl_fast.kernels`.

One op family per file, each with its plain PyTorch reference beside it."""
