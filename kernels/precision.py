"""Whether fp32 matmuls may use TF32, as PyTorch is configured, read without raising.

torch ≥ 2.9 has a new API (``torch.backends.cuda.matmul.fp32_precision``, and the generic
``torch.backends.fp32_precision`` it falls back to when "none"); once a program has set it,
reading the old flags (``torch.backends.cuda.matmul.allow_tf32``,
``torch.get_float32_matmul_precision()``) raises RuntimeError. The new flag reflects settings
made through the old API too, so it is read whenever it exists; torch 2.6–2.8 have only the
old flag.
"""

from __future__ import annotations

import torch

__all__ = ["fp32_matmul_allows_tf32"]


def fp32_matmul_allows_tf32() -> bool:
    """True when PyTorch lets fp32 CUDA matmuls run in TF32 (the kernels then do too)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        precision = matmul.fp32_precision
        if precision == "none":  # not set for cuBLAS: the generic setting decides
            precision = torch.backends.fp32_precision
        return precision == "tf32"
    return bool(matmul.allow_tf32)
