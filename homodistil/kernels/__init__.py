"""Kernels that know tensors, not models: fused importance accumulation.

Each module holds a plain-torch reference; dispatch uses Triton on CUDA and the reference
elsewhere. Nothing here imports ``homodistil.pruning`` or ``homodistil.engine``.
"""
