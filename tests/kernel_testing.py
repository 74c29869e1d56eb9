"""Shared helpers of the Triton kernel tests (CPU interpreter or CUDA)."""

import os

import pytest
import torch

HAS_TRITON = True
try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - triton is a Linux x86-64 dependency
    HAS_TRITON = False

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CAN_RUN = HAS_TRITON and (DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")

#: Module-level mark: skip kernel tests where Triton kernels cannot run.
requires_triton = pytest.mark.skipif(
    not CAN_RUN, reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 set before Python starts"
)


def assert_flash_close(got: torch.Tensor, ref32: torch.Tensor, same_dtype_ref: torch.Tensor, atol: float = 1e-5):
    """FlashAttention's rule: the kernel's error against the fp32 reference is at most twice
    the error of the same computation done by PyTorch in the kernel's dtype (plus atol)."""
    kernel_err = (got.float() - ref32).abs().max().item()
    torch_err = (same_dtype_ref.float() - ref32).abs().max().item()
    assert kernel_err <= 2 * torch_err + atol, f"kernel error {kernel_err:.3g} > 2 × PyTorch error {torch_err:.3g}"
