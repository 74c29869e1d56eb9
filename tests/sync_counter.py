"""Count the calls that make the host wait for the device (device → host syncs).

On CUDA, ``torch.cuda.set_sync_debug_mode`` reports syncs; on the CPU there is no device to wait for, so
:class:`SyncCounter` patches, while it is active, every Python-level entry that would sync if the tensors
were on a GPU and records each call: reading a value (``item``, ``tolist``, ``bool()`` / ``int()`` /
``float()`` / ``index()`` of a tensor, ``numpy``, ``cpu``), data-dependent output shapes (``nonzero``,
``masked_select``, ``unique``, indexing or assigning through a boolean mask, ``repeat_interleave``
without ``output_size``). The patches are on ``torch.Tensor`` and ``torch``, so they also see the calls
made inside the fused ops' Python implementations and checks (a ``TorchFunctionMode`` would not: custom
ops run their kernels with it off). Calls that read only shapes, dtypes or devices are not counted: they
never touch the data. C++-internal syncs of ATen kernels are not seen (none of the ops listed here is
called there on this path).
"""

from __future__ import annotations

import torch
from torch import Tensor

_METHODS = (
    "item",
    "tolist",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "numpy",
    "cpu",
    "nonzero",
    "masked_select",
    "unique",
    "repeat_interleave",
)
_FUNCTIONS = ("nonzero", "masked_select", "unique", "repeat_interleave")


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)


class SyncCounter:
    """``with SyncCounter() as c: ...`` then ``c.calls``: the name of every syncing call, in order."""

    def __init__(self):
        self.calls: list[str] = []
        self._saved: list[tuple[object, str, object]] = []

    def _patch(self, owner, name: str, counts) -> None:
        real = getattr(owner, name)
        self._saved.append((owner, name, real))

        def wrapper(*args, **kwargs):
            if counts(args, kwargs):
                self.calls.append(name)
            return real(*args, **kwargs)

        setattr(owner, name, wrapper)

    def __enter__(self) -> SyncCounter:
        def on_device(args, kwargs) -> bool:
            first = args[0] if args else None
            if name_is_sized(kwargs):
                return False
            return not (isinstance(first, Tensor) and first.device.type == "meta")

        def name_is_sized(kwargs) -> bool:
            return "output_size" in kwargs

        for name in _METHODS:
            self._patch(Tensor, name, on_device)
        for name in _FUNCTIONS:
            self._patch(torch, name, on_device)
        for name in ("__getitem__", "__setitem__"):
            self._patch(Tensor, name, lambda args, kwargs: len(args) > 1 and _bool_index(args[1]))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, real in reversed(self._saved):
            setattr(owner, name, real)
        self._saved.clear()
