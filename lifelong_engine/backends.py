"""Which implementation serves a call of a fused op.

A backend is a named set of implementations, one per op name, with the reference
signature (see :mod:`lifelong_engine.reference`), plus a ``why_not`` predicate that says
why it cannot run given inputs (wrong device, dtype it does not support, ...) or returns
None when it can.

A ``*_backward`` implementation whose function has the attribute ``takes_needs = True`` is
also given ``needs=`` (one bool per gradient it returns) and skips the gradients not needed. A
forward implementation with ``differentiable = True`` is built from differentiable PyTorch ops:
the trusted hot-path entries of :mod:`lifelong_engine.ops` may run it under autograd directly. A
``lora_kv_projection_grouped_packed`` implementation with a ``layers`` attribute offers that
function, differentiable and returning per-layer ([k_l], [v_l]) without the flat buffer, to
``ops.lora_kv_projection_grouped_trusted``.

The requested backend is, in order: the innermost :func:`use_backend` context, else the
``LIFELONG_BACKEND`` environment variable, else ``auto``. ``auto`` takes the first backend
of ``cuda → triton → torch → reference`` that can run the inputs on their device (the
reference always can; for CPU tensors ``auto`` uses ``torch``, the fast plain-PyTorch one of
:mod:`lifelong_engine.torch_backend`); an explicitly requested backend that cannot run them
raises :class:`BackendUnavailableError` with the reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from . import reference
from .errors import BackendUnavailableError

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "available_backends",
    "register_backend",
    "requested_backend",
    "select",
    "use_backend",
]

BACKEND_NAMES = ("auto", "triton", "cuda", "torch", "reference")
_AUTO_ORDER = ("cuda", "triton", "torch", "reference")  # fastest first
ENV_VAR = "LIFELONG_BACKEND"


@dataclass(frozen=True)
class Backend:
    """name: one of BACKEND_NAMES; impls: op name → function taking the op's arguments
    as positional tensors/scalars in schema order; why_not(op, args) → reason or None;
    auto_devices: device types on which ``auto`` may pick it (None = any). A backend can
    run more than ``auto`` picks it for (Triton's CPU interpreter is for tests, not speed)."""

    name: str
    impls: Mapping[str, Callable]
    why_not: Callable[[str, tuple], str | None]
    auto_devices: tuple[str, ...] | None = None


_registry: dict[str, Backend] = {}
# Why a known backend is missing from this installation, for the error message.
_missing: dict[str, str] = {
    "triton": "no Triton kernels are registered in this installation",
    "cuda": "the CUDA C++ kernels are not built in this installation",
}
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("lifelong_backend", default=None)


def register_backend(backend: Backend) -> None:
    if backend.name not in BACKEND_NAMES or backend.name == "auto":
        raise ValueError(f"backend name {backend.name!r}: expected one of {BACKEND_NAMES[1:]}")
    _registry[backend.name] = backend
    _missing.pop(backend.name, None)


def mark_missing(name: str, reason: str) -> None:
    """Record why backend ``name`` cannot be registered here (e.g. its package is not installed)."""
    _registry.pop(name, None)
    _missing[name] = reason


def _check_name(name: str, source: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source}={name!r}: expected one of {', '.join(BACKEND_NAMES)}")
    return name


def requested_backend() -> str:
    """The backend asked for right now: use_backend() context, else $LIFELONG_BACKEND, else 'auto'."""
    name = _override.get()
    if name is not None:
        return name
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the fused ops inside the block with backend ``name`` (auto|triton|cuda|torch|reference).

    >>> with use_backend("reference"):
    ...     k, v = lora_kv_projection(...)
    """
    token = _override.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


def available_backends() -> list[str]:
    """Backends registered in this installation, fastest first (not all run every input)."""
    return [name for name in _AUTO_ORDER if name in _registry]


def select(op: str, args: tuple, requested: str | None = None) -> Callable:
    """The implementation of ``op`` that serves ``args`` under the ``requested`` backend."""
    requested = requested or requested_backend()
    if requested == "auto":
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        for name in _AUTO_ORDER:
            backend = _registry.get(name)
            if backend is None or op not in backend.impls:
                continue
            if backend.auto_devices is not None and device not in backend.auto_devices:
                continue
            if backend.why_not(op, args) is None:
                return backend.impls[op]
        raise AssertionError(f"no backend can run {op}; the reference backend should always be registered")
    backend = _registry.get(requested)
    if backend is None:
        raise BackendUnavailableError(f"backend {requested!r} requested for {op}: {_missing[requested]}")
    if op not in backend.impls:
        raise BackendUnavailableError(f"backend {requested!r} has no implementation of {op}")
    reason = backend.why_not(op, args)
    if reason is not None:
        raise BackendUnavailableError(f"backend {requested!r} cannot run {op}: {reason}")
    return backend.impls[op]


def _reference_backend() -> Backend:
    ops = (
        "lora_kv_projection",
        "lora_term",
        "regional_cross_attention",
        "ewa_weights",
        "ewa_merge",
        "ewa_weights_rows",
    )
    impls = {}
    for op in ops:
        impls[op] = getattr(reference, op)
        impls[op + "_backward"] = getattr(reference, op + "_backward")
    for name in (
        "lora_kv_projection_grouped",
        "lora_kv_projection_grouped_packed",
        "lora_kv_projection_grouped_backward",
    ):
        impls[name] = getattr(reference, name)
    return Backend("reference", impls, lambda op, args: None)


register_backend(_reference_backend())
