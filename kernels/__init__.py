"""Triton kernels of the fused ops, installed as ``lifelong_engine.kernels``.

One op per module (private ``@triton.jit`` kernels, then a plain launcher); the ops in
:mod:`lifelong_engine.ops` reach them through the ``triton`` backend.
"""
