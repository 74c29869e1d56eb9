"""The ``triton`` backend: the kernels of :mod:`lifelong_engine.kernels` behind the public ops.

``auto`` picks it for CUDA tensors. Asked for explicitly (``LIFELONG_BACKEND=triton``) it
also runs CPU tensors when Triton's interpreter is on (``TRITON_INTERPRET=1`` set before
Python starts): that is how CI tests the kernels, not a fast path.
Kernel modules are imported on first use, so ``import lifelong_engine`` stays light.

Plain cross-attention (regional attention with one prompt slot and no ``kv_len``) goes to PyTorch's
SDPA on a GPU, not to the kernel: on an H200 (bf16, SD-1.5 and SDXL shapes, batch 2 and 8) SDPA took
0.18–0.62× the kernel's time in all 12 cases (``bench/results/nvidia-h200/``). The kernel serves every
call with regions or ``kv_len``, every backward, and every call under the interpreter (the CI tests).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch
import torch.nn.functional as F

from . import reference
from .backends import Backend, mark_missing, register_backend

# op → kernel module (in lifelong_engine.kernels) that implements it and its backward.
_MODULES = {
    "lora_kv_projection": "lora_kv",
    "lora_kv_projection_grouped": "lora_kv",
    "lora_kv_projection_grouped_packed": "lora_kv",
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
        module = _module(op)
        if op == "lora_kv_projection_grouped":  # the kernel's flat (B·T·ΣDout,) buffers are the op's outputs
            return module.lora_kv_projection_grouped(*args, flat=True)
        if op == "lora_kv_projection_grouped_packed":  # base weights packed once by the caller: no copy here
            c, w_k, w_v, douts, *rest = args
            packed = module.LayerPack(w_k, w_v, None, None, None, None, tuple(douts))
            return module.lora_kv_projection_grouped(c, None, None, *rest, packed=packed, flat=True)
        if op == "lora_kv_projection_grouped_backward":  # no grouped backward kernel: the per-layer one per layer
            return reference.lora_kv_projection_grouped_backward(*args, module.lora_kv_projection_backward)
        if op == "regional_cross_attention" and plain_attention(args[1], args[4]):
            q, k, v, _, _, scale = args
            return F.scaled_dot_product_attention(q, k[:, 0], v[:, 0], scale=scale)
        return getattr(module, op)(*args)

    run.__name__ = op
    return run


def plain_attention(k: torch.Tensor, kv_len: torch.Tensor | None) -> bool:
    """Whether a regional attention call is plain cross-attention that SDPA serves faster (module
    docstring): one slot, every key valid, not under the interpreter (there the kernel is what is tested)."""
    return k.shape[1] == 1 and kv_len is None and not interpreting()


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
    if op.startswith("lora_kv_projection_grouped"):  # the kernel's limits, on layer 0's arguments (same B, T, dtypes)
        grads = args[:2] if op.endswith("_backward") else ()
        c, *lists, ids, weights, scale = args[len(grads) :]
        if c.shape[0] == 0:
            return None
        if op.endswith("_packed"):
            w_k, w_v, douts, *lists = lists
            lists = [[w_k[: douts[0]]], [w_v[: douts[0]]], *lists]
        layer0 = tuple(g[: c.shape[1] * c.shape[2] * lists[0][0].shape[0]].view(*c.shape[1:3], -1) for g in grads)
        args = (*layer0, c[0], *(layers[0] for layers in lists), ids[0], weights[0], scale)
    return _module(op).why_not(args)


def register() -> None:
    if importlib.util.find_spec("triton") is None:
        mark_missing("triton", "the triton package is not installed")
        return
    # The packed grouped entry shares the grouped op's backward.
    names = [
        name
        for op in _MODULES
        for name in (op, op + "_backward")
        if name != "lora_kv_projection_grouped_packed_backward"
    ]
    register_backend(Backend("triton", {name: _impl(name) for name in names}, why_not, auto_devices=("cuda",)))


register()
