"""The ``triton`` backend: the kernels of :mod:`lifelong_engine.kernels` behind the public ops.

``auto`` picks it for CUDA tensors. Asked for explicitly (``LIFELONG_BACKEND=triton``) it
also runs CPU tensors when Triton's interpreter is on (``TRITON_INTERPRET=1`` set before
Python starts): that is how CI tests the kernels, not a fast path.
Kernel modules are imported on first use, so ``import lifelong_engine`` stays light.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from .backends import Backend, mark_missing, register_backend

# op → kernel module (in lifelong_engine.kernels) that implements it and its backward.
_MODULES = {
    "lora_kv_projection": "lora_kv",
    "lora_kv_projection_grouped": "lora_kv",
    "regional_cross_attention": "regional_attention",
    "ewa_weights": "ewa",
    "ewa_merge": "ewa",
    "ewa_weights_rows": "ewa_official",
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _module(op: str):
    return importlib.import_module(f"lifelong_engine.kernels.{_MODULES[op.removesuffix('_backward')]}")


def _impl(op: str):
    def run(*args):
        if op == "lora_kv_projection_grouped":  # the kernel's flat (B·T·ΣDout,) buffers are the op's outputs
            return _module(op).lora_kv_projection_grouped(*args, flat=True)
        return getattr(_module(op), op)(*args)

    run.__name__ = op
    return run


def why_not(op: str, args: tuple) -> str | None:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    device = tensors[0].device
    if device.type == "cpu":
        if not interpreting():
            return "it runs CUDA tensors, or CPU tensors only with TRITON_INTERPRET=1 set before Python starts"
        if any(t.dtype == torch.bfloat16 for t in tensors):
            return "bfloat16 is not supported by Triton's CPU interpreter (its bf16 tl.dot is wrong); use float16/32"
    elif device.type != "cuda":
        return f"tensors are on {device}; it runs CUDA tensors"
    if op == "lora_kv_projection_grouped":  # the kernel's limits, on layer 0's arguments (same B, T, dtypes)
        c, *lists, ids, weights, scale = args
        if c.shape[0] == 0:
            return None
        args = (c[0], *(layers[0] for layers in lists), ids[0], weights[0], scale)
    return _module(op).why_not(args)


def register() -> None:
    if importlib.util.find_spec("triton") is None:
        mark_missing("triton", "the triton package is not installed")
        return
    # The grouped op is inference only (no backward).
    names = [
        name for op in _MODULES for name in (op, op + "_backward") if name != "lora_kv_projection_grouped_backward"
    ]
    register_backend(Backend("triton", {name: _impl(name) for name in names}, why_not, auto_devices=("cuda",)))


register()
