"""Validation of the fused ops' inputs at the public boundary.

Argument types are checked first, by the public functions, against each op's schema
(:func:`argument_types`). Shape, dtype and device checks run everywhere, including on fake
tensors under ``torch.compile``; value checks (ids in range, finite psi, ...) read the data and
run only in the real implementation. Errors name the argument and say what was expected:
``TypeError`` for an argument of the wrong type or dtype, ``ValueError`` for everything else.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

NORMS = ("fro", "l1")


_SCHEMA_TYPES = {  # schema type → (accepted Python types, what the error says)
    "Tensor": ((Tensor,), "a torch.Tensor"),
    "float": ((numbers.Real, torch.SymFloat, torch.SymInt), "a real number"),
    "str": ((str,), "a string"),
    "List[Tensor]": ((list, tuple), "a list of torch.Tensor"),
}


def argument_types(op: str, schema, arguments: dict) -> None:
    """Raise TypeError naming the argument unless every given value has its schema type (Tensor, float:
    a real number but not a bool, str; an Optional one also takes None)."""
    for arg in schema.arguments:
        if arg.name not in arguments:
            continue
        value, kind = arguments[arg.name], str(arg.type)
        optional = kind.startswith("Optional[")
        types, what = _SCHEMA_TYPES[kind[len("Optional[") : -1] if optional else kind]
        if (value is None and optional) or (isinstance(value, types) and not isinstance(value, bool)):
            continue
        got = type(value).__name__ if isinstance(value, Tensor) else f"{type(value).__name__} {value!r:.80}"
        raise TypeError(f"{op}: {arg.name} must be {what}{' or None' if optional else ''}, got {got}")


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _tensor(op: str, name: str, t: object, ndim: int, layout: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {_shape(t)}")
    return t


def _floating(op: str, name: str, t: Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def _integer(op: str, name: str, t: Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must be an integer tensor, got {t.dtype}")


def _same_dtype(op: str, ref_name: str, ref: Tensor, **others: Tensor) -> None:
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected {ref.dtype}, the dtype of {ref_name}")


def _same_device(op: str, ref_name: str, ref: Tensor, **others: Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device}; expected {ref.device}, the device of {ref_name}")


def _dim(op: str, name: str, t: Tensor, axis: int, expected: int, what: str) -> None:
    if t.shape[axis] != expected:
        raise ValueError(f"{op}: {name} has shape {_shape(t)}; dim {axis} must be {expected} ({what})")


def _finite_scalar(op: str, name: str, x: float | None, dtype: torch.dtype, of: str) -> None:
    """x finite, and representable in ``dtype`` (the dtype the op computes with it in: ``of``'s)."""
    if x is None:
        return
    if not math.isfinite(x):
        raise ValueError(f"{op}: {name} must be a finite number, got {x}")
    if abs(x) > torch.finfo(dtype).max:
        top = torch.finfo(dtype).max
        raise ValueError(f"{op}: {name}={x} does not fit in {dtype}, the dtype of {of}; expected |{name}| <= {top}")


def _any(*conditions: Tensor) -> list[bool]:
    """Evaluate several data-dependent conditions with one device sync."""
    return torch.stack([c.any() for c in conditions]).tolist()


# --------------------------------------------------------------------------- lora_kv


def lora_kv_projection_grouped(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale, values: bool) -> None:
    """Every layer l checked as lora_kv_projection(c[l], …, ids[l], weights[l]), errors naming the layer;
    all layers share B, T, Din, N and r (one pool layout)."""
    op = "lora_kv_projection_grouped"
    _tensor(op, "c", c, 4, "[L, B, T, Din]")
    n_layers, bsz = c.shape[0], c.shape[1]
    lists = dict(w_k=w_k, w_v=w_v, a_k=a_k, b_k=b_k, a_v=a_v, b_v=b_v)
    for name, lst in lists.items():
        if len(lst) != n_layers:
            raise ValueError(f"{op}: {name} has {len(lst)} layers; expected L = {n_layers}, the first dim of c")
    for name, t in dict(ids=ids, weights=weights).items():
        _tensor(op, name, t, 3, "[L, B, S]")
        if t.shape[:2] != (n_layers, bsz):
            raise ValueError(f"{op}: {name} has shape {_shape(t)}; expected (L, B, S) = ({n_layers}, {bsz}, S)")
    for layer in range(n_layers):
        if a_k[layer].shape[:2] != a_k[0].shape[:2]:
            raise ValueError(
                f"{op}: a_k[{layer}] has shape {_shape(a_k[layer])}; expected (N, r) = {_shape(a_k[0])[:2]} "
                "as in layer 0 (one adapter pool for all layers)"
            )
        try:
            lora_kv_projection(
                c[layer], w_k[layer], w_v[layer], a_k[layer], b_k[layer], a_v[layer], b_v[layer], ids[layer],
                weights[layer], scale, values=False,
            )  # fmt: skip
        except (TypeError, ValueError) as error:
            raise type(error)(f"{op}: layer {layer}: {error}") from None
    if values and ids.numel():  # all layers' ids in one check (one host sync)
        n = a_k[0].shape[0]
        below, above = _any(ids < -1, ids >= n)
        if below:
            raise ValueError(f"{op}: ids has values < -1 (min {int(ids.min())}); use -1 for an empty slot")
        if above:
            raise ValueError(f"{op}: ids has values >= N = {n} (max {int(ids.max())}), the adapter count of a_k")


def lora_kv_projection(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale, values: bool) -> None:
    op = "lora_kv_projection"
    _tensor(op, "c", c, 3, "[B, T, Din]")
    _floating(op, "c", c)
    bsz, _, din = c.shape
    _tensor(op, "w_k", w_k, 2, "[Dout, Din]")
    _dim(op, "w_k", w_k, 1, din, "Din, the last dim of c")
    dout = w_k.shape[0]
    _tensor(op, "w_v", w_v, 2, "[Dout, Din]")
    if w_v.shape != w_k.shape:
        raise ValueError(f"{op}: w_v has shape {_shape(w_v)}; expected {_shape(w_k)}, the shape of w_k")
    _tensor(op, "a_k", a_k, 3, "[N, r, Din]")
    _dim(op, "a_k", a_k, 2, din, "Din, the last dim of c")
    n, rank = a_k.shape[0], a_k.shape[1]
    _tensor(op, "b_k", b_k, 3, "[N, Dout, r]")
    _dim(op, "b_k", b_k, 0, n, "N, the adapter count of a_k")
    _dim(op, "b_k", b_k, 1, dout, "Dout, the first dim of w_k")
    _dim(op, "b_k", b_k, 2, rank, "r, the rank of a_k")
    _tensor(op, "a_v", a_v, 3, "[N, r, Din]")
    if a_v.shape != a_k.shape:
        raise ValueError(f"{op}: a_v has shape {_shape(a_v)}; expected {_shape(a_k)}, the shape of a_k")
    _tensor(op, "b_v", b_v, 3, "[N, Dout, r]")
    if b_v.shape != b_k.shape:
        raise ValueError(f"{op}: b_v has shape {_shape(b_v)}; expected {_shape(b_k)}, the shape of b_k")
    _same_dtype(op, "c", c, w_k=w_k, w_v=w_v, a_k=a_k, b_k=b_k, a_v=a_v, b_v=b_v)
    _tensor(op, "ids", ids, 2, "[B, S]")
    _integer(op, "ids", ids)
    _dim(op, "ids", ids, 0, bsz, "B, the batch of c")
    _tensor(op, "weights", weights, 2, "[B, S]")
    _floating(op, "weights", weights)
    if weights.shape != ids.shape:
        raise ValueError(f"{op}: weights has shape {_shape(weights)}; expected {_shape(ids)}, one weight per ids slot")
    _same_device(op, "c", c, w_k=w_k, w_v=w_v, a_k=a_k, b_k=b_k, a_v=a_v, b_v=b_v, ids=ids, weights=weights)
    _finite_scalar(op, "scale", scale, c.dtype, "c")
    if values and ids.numel():
        below, above = _any(ids < -1, ids >= n)
        if below:
            raise ValueError(f"{op}: ids has values < -1 (min {int(ids.min())}); use -1 for an empty slot")
        if above:
            raise ValueError(f"{op}: ids has values >= N = {n} (max {int(ids.max())}), the adapter count of a_k")


def lora_term(x, a, b, ids, weights, scale, values: bool) -> None:
    op = "lora_term"
    _tensor(op, "x", x, 3, "[B, T, Din]")
    _floating(op, "x", x)
    bsz, _, din = x.shape
    _tensor(op, "a", a, 3, "[N, r, Din]")
    _dim(op, "a", a, 2, din, "Din, the last dim of x")
    n, rank = a.shape[0], a.shape[1]
    _tensor(op, "b", b, 3, "[N, Dout, r]")
    _dim(op, "b", b, 0, n, "N, the adapter count of a")
    _dim(op, "b", b, 2, rank, "r, the rank of a")
    _same_dtype(op, "x", x, a=a, b=b)
    _tensor(op, "ids", ids, 2, "[B, S]")
    _integer(op, "ids", ids)
    _dim(op, "ids", ids, 0, bsz, "B, the batch of x")
    _tensor(op, "weights", weights, 2, "[B, S]")
    _floating(op, "weights", weights)
    if weights.shape != ids.shape:
        raise ValueError(f"{op}: weights has shape {_shape(weights)}; expected {_shape(ids)}, one weight per ids slot")
    _same_device(op, "x", x, a=a, b=b, ids=ids, weights=weights)
    _finite_scalar(op, "scale", scale, x.dtype, "x")
    if values and ids.numel():
        below, above = _any(ids < -1, ids >= n)
        if below or above:
            lo, hi = int(ids.min()), int(ids.max())
            raise ValueError(f"{op}: ids has values in [{lo}, {hi}]; expected -1 (empty) or adapters in [0, {n - 1}]")


# ------------------------------------------------------------------ regional attention


def regional_cross_attention(q, k, v, region_ids, kv_len, scale, values: bool) -> None:
    op = "regional_cross_attention"
    _tensor(op, "q", q, 4, "[B, H, N, d]")
    _floating(op, "q", q)
    bsz, heads, n_q, d = q.shape
    if d < 1:
        raise ValueError(f"{op}: q has shape {_shape(q)}; need a head dim d >= 1")
    _tensor(op, "k", k, 5, "[B, P, H, T, d]")
    _dim(op, "k", k, 0, bsz, "B, the batch of q")
    _dim(op, "k", k, 2, heads, "H, the heads of q")
    _dim(op, "k", k, 4, d, "d, the head dim of q")
    n_slots, t_len = k.shape[1], k.shape[3]
    if n_slots < 1 or t_len < 1:
        raise ValueError(f"{op}: k has shape {_shape(k)}; need at least one prompt slot P and one key T")
    _tensor(op, "v", v, 5, "[B, P, H, T, d]")
    if v.shape != k.shape:
        raise ValueError(f"{op}: v has shape {_shape(v)}; expected {_shape(k)}, the shape of k")
    _same_dtype(op, "q", q, k=k, v=v)
    _tensor(op, "region_ids", region_ids, 2, "[B, N]")
    _integer(op, "region_ids", region_ids)
    if region_ids.shape != (bsz, n_q):
        raise ValueError(f"{op}: region_ids has shape {_shape(region_ids)}; expected {(bsz, n_q)}, [B, N] of q")
    if kv_len is not None:
        _tensor(op, "kv_len", kv_len, 2, "[B, P]")
        _integer(op, "kv_len", kv_len)
        if kv_len.shape != (bsz, n_slots):
            raise ValueError(f"{op}: kv_len has shape {_shape(kv_len)}; expected {(bsz, n_slots)}, [B, P] of k")
    _same_device(op, "q", q, k=k, v=v, region_ids=region_ids, kv_len=kv_len)
    _finite_scalar(op, "scale", scale, q.dtype, "q")
    if values:
        conds = [region_ids < 0, region_ids >= n_slots]
        if kv_len is not None:
            conds += [kv_len < 1, kv_len > t_len]
        bad = _any(*conds)
        if bad[0] or bad[1]:
            lo, hi = int(region_ids.min()), int(region_ids.max())
            raise ValueError(
                f"{op}: region_ids has values in [{lo}, {hi}]; expected slots in [0, {n_slots - 1}] (P = {n_slots})"
            )
        if kv_len is not None and (bad[2] or bad[3]):
            lo, hi = int(kv_len.min()), int(kv_len.max())
            raise ValueError(
                f"{op}: kv_len has values in [{lo}, {hi}]; expected key counts in [1, {t_len}] (T = {t_len})"
            )


# ------------------------------------------------------------------------------- EWA


def ewa_weights(prompt, concepts, prompt_mask, power, norm, values: bool) -> None:
    op = "ewa_weights"
    _tensor(op, "prompt", prompt, 4, "[B, L, T, D]")
    _floating(op, "prompt", prompt)
    bsz, layers, t_len, dim = prompt.shape
    if t_len < 1:
        raise ValueError(f"{op}: prompt has shape {_shape(prompt)}; need at least one token T")
    _tensor(op, "concepts", concepts, 3, "[L, G, D]")
    if concepts.shape[0] != layers:
        raise ValueError(
            f"{op}: concepts has {concepts.shape[0]} layers (shape {_shape(concepts)}); "
            f"expected L = {layers}, the layer count of prompt"
        )
    _dim(op, "concepts", concepts, 2, dim, "D, the embedding width of prompt")
    _same_dtype(op, "prompt", prompt, concepts=concepts)
    if prompt_mask is not None:
        _tensor(op, "prompt_mask", prompt_mask, 2, "[B, T]")
        if prompt_mask.dtype != torch.bool:
            raise TypeError(f"{op}: prompt_mask must be a bool tensor, got {prompt_mask.dtype}")
        if prompt_mask.shape != (bsz, t_len):
            raise ValueError(
                f"{op}: prompt_mask has shape {_shape(prompt_mask)}; expected {(bsz, t_len)}, [B, T] of prompt"
            )
    _same_device(op, "prompt", prompt, concepts=concepts, prompt_mask=prompt_mask)
    if norm not in NORMS:
        raise ValueError(f"{op}: norm={norm!r}; expected one of {NORMS}")
    if not power > 0:
        raise ValueError(f"{op}: power must be a finite number > 0, got {power}")
    _finite_scalar(op, "power", power, prompt.dtype, "prompt")
    if values and prompt_mask is not None and bsz and _any(~prompt_mask.any(dim=1))[0]:
        empty = (~prompt_mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"{op}: prompt_mask rows {empty} select no token; every sample needs at least one")


def ewa_weights_rows(prompt, concepts, concept_rows, prompt_mask, power, norm, values: bool) -> None:
    op = "ewa_weights_rows"
    _tensor(op, "prompt", prompt, 4, "[B, L, T, D]")
    _floating(op, "prompt", prompt)
    bsz, layers, t_len, dim = prompt.shape
    if t_len < 1:
        raise ValueError(f"{op}: prompt has shape {_shape(prompt)}; need at least one token T")
    _tensor(op, "concepts", concepts, 4, "[L, G, W, D]")
    n_concepts, n_rows = concepts.shape[1:3]
    _dim(op, "concepts", concepts, 0, layers, "L, the layer count of prompt")
    _dim(op, "concepts", concepts, 3, dim, "D, the embedding width of prompt")
    _same_dtype(op, "prompt", prompt, concepts=concepts)
    if prompt_mask is not None:
        _tensor(op, "prompt_mask", prompt_mask, 2, "[B, T]")
        if prompt_mask.dtype != torch.bool or prompt_mask.shape != (bsz, t_len):
            raise ValueError(
                f"{op}: prompt_mask is {prompt_mask.dtype} {_shape(prompt_mask)}; expected bool {(bsz, t_len)}"
            )
    if norm not in NORMS:
        raise ValueError(f"{op}: norm={norm!r}; expected one of {NORMS}")
    if not (math.isfinite(power) and power > 0):
        raise ValueError(f"{op}: power must be a finite number > 0, got {power}")
    _tensor(op, "concept_rows", concept_rows, 2, "[G, W]")
    if concept_rows.dtype != torch.bool:
        raise TypeError(f"{op}: concept_rows must be a bool tensor, got {concept_rows.dtype}")
    if concept_rows.shape != (n_concepts, n_rows):
        raise ValueError(
            f"{op}: concept_rows has shape {_shape(concept_rows)}; expected {(n_concepts, n_rows)}, [G, W] of concepts"
        )
    _same_device(op, "prompt", prompt, concepts=concepts, concept_rows=concept_rows, prompt_mask=prompt_mask)
    if values and prompt_mask is not None and bsz and _any(~prompt_mask.any(dim=1))[0]:
        raise ValueError(f"{op}: some prompt_mask rows select no token; every sample needs at least one")
    if values and n_concepts and _any(~concept_rows.any(dim=1))[0]:
        empty = (~concept_rows.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"{op}: concept_rows rows {empty} select no token row; every concept needs at least one")


def ewa_merge(psi, a, b, scale, values: bool) -> None:
    op = "ewa_merge"
    _tensor(op, "psi", psi, 2, "[B, G]")
    _floating(op, "psi", psi)
    g = psi.shape[1]
    _tensor(op, "a", a, 3, "[G, r, Din]")
    _floating(op, "a", a)
    _dim(op, "a", a, 0, g, "G, the concept count of psi")
    _tensor(op, "b", b, 3, "[G, Dout, r]")
    _dim(op, "b", b, 0, g, "G, the concept count of psi")
    _dim(op, "b", b, 2, a.shape[1], "r, the rank of a")
    _same_dtype(op, "a", a, b=b)
    _same_device(op, "psi", psi, a=a, b=b)
    _finite_scalar(op, "scale", scale, a.dtype, "a")
    if values and psi.numel() and _any(~torch.isfinite(psi))[0]:
        raise ValueError(f"{op}: psi contains non-finite values (NaN or inf); EWA weights must be finite")
