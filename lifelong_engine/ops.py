"""The fused ops, registered with ``torch.library`` as ``torch.ops.lifelong.<name>``.

The public functions here check their arguments' types against the op's schema (a
``TypeError`` naming the argument, before torch's schema parser), then call the op
(``torch.ops.lifelong.<name>``, the registered op, is what ``torch.library.opcheck`` takes).
Each op validates its inputs (:mod:`lifelong_engine.checks`), then runs the
implementation of the selected backend (:mod:`lifelong_engine.backends`): the
``reference`` backend is :mod:`lifelong_engine.reference`; faster ones plug in there
without changing callers. Every op has a fake (meta) implementation for
``torch.compile`` and an autograd formula whose backward is itself a registered op,
dispatched to the backend chosen when the forward ran.

Backends: ``LIFELONG_BACKEND=auto|triton|cuda|torch|reference`` or ``with use_backend(name):``.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from . import backends, checks, reference, torch_backend, triton_backend  # noqa: F401  (register the backends)
from .backends import available_backends, requested_backend, use_backend

__all__ = [
    "lora_kv_projection",
    "lora_kv_projection_grouped",
    "lora_term",
    "regional_cross_attention",
    "ewa_weights",
    "ewa_merge",
    "ewa_weights_rows",
    "use_backend",
    "available_backends",
    "requested_backend",
]


def _custom_op(name: str):
    """torch.library.custom_op that keeps the function's docstring and signature for help()."""

    def register(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.__doc__, op.__signature__ = fn.__doc__, inspect.signature(fn)
        return op

    return register


def _public(name: str):
    """The public function of custom op ``name``: argument types checked first, against the op's schema
    (torch's schema parser would refuse ``scale='2'`` with a RuntimeError that names no argument),
    then the op. ``torch.ops.lifelong.<name>`` is the op itself."""
    op = globals()["_" + name]
    schema = getattr(torch.ops.lifelong, name).default._schema

    def call(*args, **kwargs):
        bound = op.__signature__.bind(*args, **kwargs)
        checks.argument_types(name, schema, bound.arguments)
        return op(*bound.args, **bound.kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__, call.__signature__ = op.__doc__, op.__signature__
    return call


def _contiguous(out):
    """Every op returns contiguous tensors, whatever its backend computed (the torch backend's SDPA returns
    q's layout), so the fake implementations (contiguous, :func:`_empty`) describe every backend."""
    if isinstance(out, (tuple, list)):  # several outputs; a list-typed output (grouped ops' gradients) likewise
        return type(out)(_contiguous(t) for t in out)
    return out.contiguous() if out is not None else None


def _empty(x: Tensor) -> Tensor:
    """A fake output shaped like x, contiguous as the real outputs are (``empty_like`` keeps x's strides)."""
    return x.new_empty(x.shape)


def _run(op: str, *args, backend: str | None = None):
    return _contiguous(backends.select(op, args, backend)(*args))


def _run_backward(op: str, *args, needs: list[bool], backend: str):
    """A backward op's implementation; one that takes ``needs`` skips the gradients not needed."""
    impl = backends.select(op, args, backend)
    return _contiguous(impl(*args, needs=needs) if getattr(impl, "takes_needs", False) else impl(*args))


def _keep_needed(ctx, grads: tuple) -> tuple:
    """Drop gradients of inputs that do not need one (autograd wants None there)."""
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


# --------------------------------------------------------------------------- lora_kv


@_custom_op("lifelong::lora_kv_projection")
def _lora_kv_projection(
    c: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    a_k: Tensor,
    b_k: Tensor,
    a_v: Tensor,
    b_v: Tensor,
    ids: Tensor,
    weights: Tensor,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Base K/V projection of text embeddings plus a weighted sum of LoRA adapters per sample.

    c: (B, T, Din) text embeddings of this layer; w_k, w_v: (Dout, Din) frozen base weights;
    a_k, a_v: (N, r, Din) adapter pool lora_A; b_k, b_v: (N, Dout, r) lora_B;
    ids: (B, S) int adapters of each sample, -1 = empty slot; weights: (B, S) float.
    Semantics: k[b] = c[b]·W_kᵀ + Σ_s weights[b,s]·scale·(c[b]·a_k[ids[b,s]]ᵀ)·b_k[ids[b,s]]ᵀ,
    v likewise. Returns (k, v), each (B, T, Dout) in the dtype of c.
    Differentiable in c, w_k, w_v, a_k, b_k, a_v, b_v and weights.
    """
    checks.lora_kv_projection(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale, values=True)
    return _run("lora_kv_projection", c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale)


@_lora_kv_projection.register_fake
def _(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale=1.0):
    checks.lora_kv_projection(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale, values=False)
    shape = (c.shape[0], c.shape[1], w_k.shape[0])
    return c.new_empty(shape), c.new_empty(shape)


@_custom_op("lifelong::_lora_kv_projection_backward")
def _lora_kv_projection_backward(
    grad_k: Tensor,
    grad_v: Tensor,
    c: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    a_k: Tensor,
    b_k: Tensor,
    a_v: Tensor,
    b_v: Tensor,
    ids: Tensor,
    weights: Tensor,
    scale: float,
    needs: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dc, da_k, db_k, da_v, db_v, dweights); see reference.lora_kv_projection_backward.
    needs: which of the six are wanted (the others may be returned as zeros without being computed)."""
    args = (grad_k, grad_v, c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale)
    return _run_backward("lora_kv_projection_backward", *args, needs=needs, backend=backend)


@_lora_kv_projection_backward.register_fake
def _(grad_k, grad_v, c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale, needs, backend):
    return (
        _empty(c),
        _empty(a_k),
        _empty(b_k),
        _empty(a_v),
        _empty(b_v),
        _empty(weights),
    )


def _lora_kv_setup(ctx, inputs, output):
    *tensors, scale = inputs
    ctx.save_for_backward(*tensors)
    ctx.scale = scale
    ctx.backend = requested_backend()


def _lora_kv_backward(ctx, grad_k, grad_v):
    c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights = ctx.saved_tensors
    grad_k = c.new_zeros(c.shape[:2] + w_k.shape[:1]) if grad_k is None else grad_k
    grad_v = torch.zeros_like(grad_k) if grad_v is None else grad_v
    needs = [ctx.needs_input_grad[i] for i in (0, 3, 4, 5, 6, 8)]  # c, a_k, b_k, a_v, b_v, weights
    dc, da_k, db_k, da_v, db_v, dweights = torch.ops.lifelong._lora_kv_projection_backward(
        grad_k, grad_v, c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, ctx.scale, needs, ctx.backend
    )
    # Base weights are usually frozen; their gradient is a plain GEMM, computed only when asked.
    dw_k = torch.einsum("bto,btd->od", grad_k, c) if ctx.needs_input_grad[1] else None
    dw_v = torch.einsum("bto,btd->od", grad_v, c) if ctx.needs_input_grad[2] else None
    return _keep_needed(ctx, (dc, dw_k, dw_v, da_k, db_k, da_v, db_v, None, dweights, None))


_lora_kv_projection.register_autograd(_lora_kv_backward, setup_context=_lora_kv_setup)


@_custom_op("lifelong::lora_kv_projection_grouped")
def _lora_kv_projection_grouped(
    c: Tensor,
    w_k: list[Tensor],
    w_v: list[Tensor],
    a_k: list[Tensor],
    b_k: list[Tensor],
    a_v: list[Tensor],
    b_v: list[Tensor],
    ids: Tensor,
    weights: Tensor,
    scale: float,  # no default: autograd of list inputs fails when a default argument is left out
) -> tuple[Tensor, Tensor]:
    """:func:`lora_kv_projection` of all L cross-attention layers at once (one launch on the triton backend).

    c: (L, B, T, Din) layer-wise text embeddings; w_k, w_v: L tensors (Dout_l, Din); a_k, a_v: L tensors
    (N, r, Din); b_k, b_v: L tensors (N, Dout_l, r) (one pool: the same N, r in every layer);
    ids, weights: (L, B, S), each layer its own (EWA gives each layer its own ψ).
    Semantics: (k_l, v_l) = lora_kv_projection(c[l], w_k[l], w_v[l], a_k[l], b_k[l], a_v[l], b_v[l],
    ids[l], weights[l], scale). The registered op returns two flat buffers (B·T·ΣDout_l,), layer after
    layer; the public function returns ([k_0 … k_{L-1}], [v_0 … v_{L-1}]), each (B, T, Dout_l), views
    into them. Differentiable in c, every w, a, b and weights (the backward is the per-layer one, layer
    by layer, computing only the gradients needed).
    """
    checks.lora_kv_projection_grouped(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale, values=True)
    return _run("lora_kv_projection_grouped", c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale)


def _grouped_fake(c, w_k):
    size = c.shape[1] * c.shape[2] * sum(w.shape[0] for w in w_k)
    return c.new_empty(size), c.new_empty(size)


@_lora_kv_projection_grouped.register_fake
def _(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale=1.0):
    checks.lora_kv_projection_grouped(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale, values=False)
    return _grouped_fake(c, w_k)


@_custom_op("lifelong::_lora_kv_projection_grouped_backward")
def _lora_kv_projection_grouped_backward(
    grad_k: Tensor,
    grad_v: Tensor,
    c: Tensor,
    w_k: list[Tensor],
    w_v: list[Tensor],
    a_k: list[Tensor],
    b_k: list[Tensor],
    a_v: list[Tensor],
    b_v: list[Tensor],
    ids: Tensor,
    weights: Tensor,
    scale: float,
    needs: list[bool],
    backend: str,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor], Tensor]:
    """(dc, [da_k_l], [db_k_l], [da_v_l], [db_v_l], dweights); see reference.lora_kv_projection_grouped_backward.
    needs: which of the six are wanted (the others may be returned as zeros without being computed)."""
    args = (grad_k, grad_v, c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale)
    return _run_backward("lora_kv_projection_grouped_backward", *args, needs=needs, backend=backend)


@_lora_kv_projection_grouped_backward.register_fake
def _(grad_k, grad_v, c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale, needs, backend):
    lists = [[torch.empty_like(t) for t in lst] for lst in (a_k, b_k, a_v, b_v)]
    return torch.empty_like(c), *lists, torch.empty_like(weights)


def _grouped_save(ctx, c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale) -> None:
    ctx.n_layers = len(a_k)
    ctx.save_for_backward(c, *w_k, *w_v, *a_k, *b_k, *a_v, *b_v, ids, weights)
    ctx.scale = scale
    ctx.backend = requested_backend()
    # needs_input_grad is flattened over list elements; whether any element of a list needs one is what counts.
    ctx.needs = [c.requires_grad, *(any(t.requires_grad for t in lst) for lst in (a_k, b_k, a_v, b_v))]
    ctx.needs.append(weights.requires_grad)
    ctx.need_w = (any(t.requires_grad for t in w_k), any(t.requires_grad for t in w_v))


def _grouped_grads(ctx, grad_k, grad_v, direct: bool = False):
    """(dc, [dw_k_l] or None, [dw_v_l] or None, [da_k_l], [db_k_l], [da_v_l], [db_v_l], dweights), None
    where not needed. ``direct``: the backend's backward called as a function (the trusted training
    entry, outside torch.compile), not through the registered backward op."""
    c, *saved = ctx.saved_tensors
    n = ctx.n_layers
    w_k, w_v, a_k, b_k, a_v, b_v = (list(saved[i * n : (i + 1) * n]) for i in range(6))
    ids, weights = saved[6 * n :]
    size = c.shape[1] * c.shape[2] * sum(w.shape[0] for w in w_k)
    grad_k = c.new_zeros(size) if grad_k is None else grad_k
    grad_v = c.new_zeros(size) if grad_v is None else grad_v
    args = (grad_k, grad_v, c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, ctx.scale)
    if direct:
        grads = _run_backward("lora_kv_projection_grouped_backward", *args, needs=ctx.needs, backend=ctx.backend)
    else:
        grads = torch.ops.lifelong._lora_kv_projection_grouped_backward(*args, ctx.needs, ctx.backend)
    dc, da_k, db_k, da_v, db_v, dweights = grads
    douts = [w.shape[0] for w in w_k]
    dws = []  # base weights are usually frozen: their gradient, a plain GEMM per layer, only when asked
    for grad, need in zip((grad_k, grad_v), ctx.need_w):
        gs = reference.split_layers(grad, c.shape[1], c.shape[2], douts) if need else []
        dws.append([torch.einsum("bto,btd->od", g, c[l]) for l, g in enumerate(gs)] if need else None)
    # autograd wants a list input's gradient as a list (of Nones where none is needed)
    lists = [g if need else [None] * n for g, need in zip((da_k, db_k, da_v, db_v), ctx.needs[1:5])]
    return dc if ctx.needs[0] else None, *dws, *lists, dweights if ctx.needs[5] else None


def _grouped_setup(ctx, inputs, output):
    _grouped_save(ctx, *inputs)


def _grouped_backward(ctx, grad_k, grad_v):
    dc, dw_k, dw_v, *lists, dweights = _grouped_grads(ctx, grad_k, grad_v)
    nones = [None] * ctx.n_layers
    return dc, dw_k or nones, dw_v or nones, *lists, None, dweights, None


_lora_kv_projection_grouped.register_autograd(_grouped_backward, setup_context=_grouped_setup)


@_custom_op("lifelong::_lora_kv_projection_grouped_packed")
def _lora_kv_projection_grouped_packed(
    c: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    douts: list[int],
    a_k: list[Tensor],
    b_k: list[Tensor],
    a_v: list[Tensor],
    b_v: list[Tensor],
    ids: Tensor,
    weights: Tensor,
    scale: float,  # no default: autograd of list inputs fails when a default argument is left out
) -> tuple[Tensor, Tensor]:
    """lora_kv_projection_grouped with the base weights packed (w_k, w_v (ΣDout_l, Din)) and without its
    value checks (ids made and checked by the caller); see :func:`lora_kv_projection_grouped_trusted`."""
    checks.lora_kv_projection_grouped(c, *_layer_weights(w_k, w_v, douts), a_k, b_k, a_v, b_v, ids, weights, scale,
                                      values=False)  # fmt: skip
    return _run("lora_kv_projection_grouped_packed", c, w_k, w_v, douts, a_k, b_k, a_v, b_v, ids, weights, scale)


@_lora_kv_projection_grouped_packed.register_fake
def _(c, w_k, w_v, douts, a_k, b_k, a_v, b_v, ids, weights, scale=1.0):
    w_k, w_v = _layer_weights(w_k, w_v, douts)
    checks.lora_kv_projection_grouped(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale, values=False)
    return _grouped_fake(c, w_k)


def _layer_weights(w_k: Tensor, w_v: Tensor, douts) -> tuple[list[Tensor], list[Tensor]]:
    """Layer l's (Dout_l, Din) views of packed base weights."""
    if w_k.ndim != 2 or w_k.shape[0] != sum(douts) or w_v.shape != w_k.shape:
        raise ValueError(
            f"lora_kv_projection_grouped: packed w_k {tuple(w_k.shape)}, w_v {tuple(w_v.shape)}; expected both "
            f"(ΣDout_l, Din) with ΣDout_l = {sum(douts)}"
        )
    return list(w_k.split(list(douts))), list(w_v.split(list(douts)))


def _packed_setup(ctx, inputs, output):
    c, w_k, w_v, douts, *rest = inputs
    _grouped_save(ctx, c, *_layer_weights(w_k, w_v, douts), *rest)


def _packed_backward(ctx, grad_k, grad_v):
    dc, dw_k, dw_v, *lists, dweights = _grouped_grads(ctx, grad_k, grad_v)
    dw_k, dw_v = (torch.cat(dw) if dw is not None else None for dw in (dw_k, dw_v))
    return dc, dw_k, dw_v, None, *lists, None, dweights, None


_lora_kv_projection_grouped_packed.register_autograd(_packed_backward, setup_context=_packed_setup)


class _GroupedPackedFunction(torch.autograd.Function):
    """The trusted grouped call with autograd outside torch.compile (a training step's text side): the same
    forward and backward implementations as the registered op, called as functions, so a step pays no
    torch.library dispatch, argument normalisation or pytree work (issue 18: op overhead out of the hot
    path). Factors come flattened (a_k, b_k, a_v, b_v, n_layers each) since autograd.Function takes tensors
    positionally."""

    @staticmethod
    def forward(ctx, c, w_k, w_v, douts, ids, weights, scale, *factors):
        n = len(douts)
        a_k, b_k, a_v, b_v = (list(factors[i * n : (i + 1) * n]) for i in range(4))
        _grouped_save(ctx, c, *_layer_weights(w_k, w_v, douts), a_k, b_k, a_v, b_v, ids, weights, scale)
        return _run("lora_kv_projection_grouped_packed", c, w_k, w_v, douts, a_k, b_k, a_v, b_v, ids, weights, scale)

    @staticmethod
    def backward(ctx, grad_k, grad_v):
        dc, dw_k, dw_v, *lists, dweights = _grouped_grads(ctx, grad_k, grad_v, direct=True)
        dw_k, dw_v = (torch.cat(dw) if dw is not None else None for dw in (dw_k, dw_v))
        return dc, dw_k, dw_v, None, None, dweights, None, *(g for lst in lists for g in lst)


# ------------------------------------------------------------------------------ lora_term


@_custom_op("lifelong::lora_term")
def _lora_term(x: Tensor, a: Tensor, b: Tensor, ids: Tensor, weights: Tensor, scale: float = 1.0) -> Tensor:
    """The adapters' part of one projection, picked per sample (image-side LoRA: to_q, to_out.0).

    x: (B, T, Din) the projection's input; a: (N, r, Din) lora_A pool; b: (N, Dout, r) lora_B pool;
    ids: (B, S) int adapters of each sample, -1 = empty slot; weights: (B, S) float, in x's dtype.
    Semantics: y[b] = Σ_s weights[b,s]·scale·(x[b]·a[ids[b,s]]ᵀ)·b[ids[b,s]]ᵀ.
    Returns y (B, T, Dout). Differentiable in x, a, b and weights.
    """
    checks.lora_term(x, a, b, ids, weights, scale, values=True)
    return _run("lora_term", x, a, b, ids, weights, scale)


@_lora_term.register_fake
def _(x, a, b, ids, weights, scale=1.0):
    checks.lora_term(x, a, b, ids, weights, scale, values=False)
    return x.new_empty((x.shape[0], x.shape[1], b.shape[1]))


@_custom_op("lifelong::_lora_term_backward")
def _lora_term_backward(
    grad: Tensor, x: Tensor, a: Tensor, b: Tensor, ids: Tensor, weights: Tensor, scale: float, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, da, db, dweights); see reference.lora_term_backward."""
    return _run("lora_term_backward", grad, x, a, b, ids, weights, scale, backend=backend)


@_lora_term_backward.register_fake
def _(grad, x, a, b, ids, weights, scale, backend):
    return _empty(x), _empty(a), _empty(b), _empty(weights)


def _lora_term_setup(ctx, inputs, output):
    x, a, b, ids, weights, scale = inputs
    ctx.save_for_backward(x, a, b, ids, weights)
    ctx.scale = scale
    ctx.backend = requested_backend()


def _lora_term_bwd(ctx, grad):
    x, a, b, ids, weights = ctx.saved_tensors
    dx, da, db, dweights = torch.ops.lifelong._lora_term_backward(grad, x, a, b, ids, weights, ctx.scale, ctx.backend)
    return _keep_needed(ctx, (dx, da, db, None, dweights, None))


_lora_term.register_autograd(_lora_term_bwd, setup_context=_lora_term_setup)


# ------------------------------------------------------------------ regional attention


@_custom_op("lifelong::regional_cross_attention")
def _regional_cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    region_ids: Tensor,
    kv_len: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Cross-attention where each query attends only to the prompt slot of its region.

    q: (B, H, N, d) image queries; k, v: (B, P, H, T, d), P prompt slots, slot 0 = global prompt;
    region_ids: (B, N) int, slot of each query (0 outside every box); kv_len: (B, P) int valid
    keys per slot (None = all T); scale: softmax scale, d**-0.5 when None.
    Semantics: out[b,h,n] = softmax(q[b,h,n]·k[b,p,h,:kv_len]ᵀ·scale)·v[b,p,h,:kv_len],
               p = region_ids[b,n]. With P = 1 it is plain cross-attention. Keys and values
               ≥ kv_len never reach the output, not even a NaN or inf stored there.
    Returns (B, H, N, d). Differentiable in q, k, v.
    """
    checks.regional_cross_attention(q, k, v, region_ids, kv_len, scale, values=True)
    return _run("regional_cross_attention", q, k, v, region_ids, kv_len, scale)


@_regional_cross_attention.register_fake
def _(q, k, v, region_ids, kv_len=None, scale=None):
    checks.regional_cross_attention(q, k, v, region_ids, kv_len, scale, values=False)
    return _empty(q)


@_custom_op("lifelong::_regional_cross_attention_backward")
def _regional_cross_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    region_ids: Tensor,
    kv_len: Tensor | None,
    scale: float | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv); see reference.regional_cross_attention_backward."""
    args = (grad_out, q, k, v, region_ids, kv_len, scale)
    return _run("regional_cross_attention_backward", *args, backend=backend)


@_regional_cross_attention_backward.register_fake
def _(grad_out, q, k, v, region_ids, kv_len, scale, backend):
    return _empty(q), _empty(k), _empty(v)


def _regional_setup(ctx, inputs, output):
    q, k, v, region_ids, kv_len, scale = inputs
    ctx.save_for_backward(q, k, v, region_ids, kv_len)
    ctx.scale = scale
    ctx.backend = requested_backend()


def _regional_backward(ctx, grad_out):
    q, k, v, region_ids, kv_len = ctx.saved_tensors
    dq, dk, dv = torch.ops.lifelong._regional_cross_attention_backward(
        grad_out, q, k, v, region_ids, kv_len, ctx.scale, ctx.backend
    )
    return _keep_needed(ctx, (dq, dk, dv, None, None, None))


_regional_cross_attention.register_autograd(_regional_backward, setup_context=_regional_setup)


# ------------------------------------------------------------------------------- EWA


@_custom_op("lifelong::ewa_weights")
def _ewa_weights(
    prompt: Tensor,
    concepts: Tensor,
    prompt_mask: Tensor | None = None,
    power: float = 2.0,
    norm: str = "fro",
) -> Tensor:
    """Elastic weight aggregation (EWA) weights ψ of every concept, per sample and layer.

    prompt: (B, L, T, D) the prompt's text embedding for each layer (ĉ^l);
    concepts: (L, G, D) per layer, each concept's embedding ê^l_g;
    prompt_mask: (B, T) bool, tokens that count (exclude padding); None = all.
    power: finite, > 0 and representable in prompt's dtype.
    Semantics: M[b,l,g] = max_t cos(prompt[b,l,t], concepts[l,g]);  M⁺ = max(M, 0);
               psi[b,l,g] = M⁺^power / ‖M⁺[b,l,:]^power‖ with norm "fro" (L2, the paper's)
               or "l1". The released CIDM code's EWA is not this with power 4 and "l1": it matches each token
               row of a concept and averages, over all prompt positions (:func:`ewa_weights_rows`).
    Negative similarities: a concept no prompt token points towards (M ≤ 0) weighs 0, so ψ is a
    finite, non-negative weighting for every power (a row whose M are all ≤ 0 is all zeros: no
    concept applies). The paper's ψ(M) = M²/‖M²‖ is this wherever M ≥ 0.
    Returns psi (B, L, G). Differentiable in prompt and concepts.
    """
    checks.ewa_weights(prompt, concepts, prompt_mask, power, norm, values=True)
    return _run("ewa_weights", prompt, concepts, prompt_mask, power, norm)


@_ewa_weights.register_fake
def _(prompt, concepts, prompt_mask=None, power=2.0, norm="fro"):
    checks.ewa_weights(prompt, concepts, prompt_mask, power, norm, values=False)
    return prompt.new_empty((prompt.shape[0], prompt.shape[1], concepts.shape[1]))


@_custom_op("lifelong::_ewa_weights_backward")
def _ewa_weights_backward(
    grad_psi: Tensor,
    prompt: Tensor,
    concepts: Tensor,
    prompt_mask: Tensor | None,
    power: float,
    norm: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(dprompt, dconcepts); see reference.ewa_weights_backward."""
    args = (grad_psi, prompt, concepts, prompt_mask, power, norm)
    return _run("ewa_weights_backward", *args, backend=backend)


@_ewa_weights_backward.register_fake
def _(grad_psi, prompt, concepts, prompt_mask, power, norm, backend):
    return _empty(prompt), _empty(concepts)


def _ewa_weights_setup(ctx, inputs, output):
    prompt, concepts, prompt_mask, power, norm = inputs
    ctx.save_for_backward(prompt, concepts, prompt_mask)
    ctx.power, ctx.norm = power, norm
    ctx.backend = requested_backend()


def _ewa_weights_bwd(ctx, grad_psi):
    prompt, concepts, prompt_mask = ctx.saved_tensors
    dprompt, dconcepts = torch.ops.lifelong._ewa_weights_backward(
        grad_psi, prompt, concepts, prompt_mask, ctx.power, ctx.norm, ctx.backend
    )
    return _keep_needed(ctx, (dprompt, dconcepts, None, None, None))


_ewa_weights.register_autograd(_ewa_weights_bwd, setup_context=_ewa_weights_setup)


@_custom_op("lifelong::ewa_merge")
def _ewa_merge(psi: Tensor, a: Tensor, b: Tensor, scale: float = 1.0) -> Tensor:
    """Merge G LoRA adapters into one dense weight delta per sample (LoRA-M, merged export).

    psi: (B, G) float mixing weights (finite); a: (G, r, Din) lora_A; b: (G, Dout, r) lora_B.
    Semantics: delta[b] = Σ_g psi[b,g]·scale·b[g]·a[g].
    Returns delta (B, Dout, Din) in the dtype of a. Differentiable in psi, a and b.
    """
    checks.ewa_merge(psi, a, b, scale, values=True)
    return _run("ewa_merge", psi, a, b, scale)


@_ewa_merge.register_fake
def _(psi, a, b, scale=1.0):
    checks.ewa_merge(psi, a, b, scale, values=False)
    return a.new_empty((psi.shape[0], b.shape[1], a.shape[2]))


@_custom_op("lifelong::_ewa_merge_backward")
def _ewa_merge_backward(
    grad_delta: Tensor, psi: Tensor, a: Tensor, b: Tensor, scale: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(dpsi, da, db); see reference.ewa_merge_backward."""
    return _run("ewa_merge_backward", grad_delta, psi, a, b, scale, backend=backend)


@_ewa_merge_backward.register_fake
def _(grad_delta, psi, a, b, scale, backend):
    return _empty(psi), _empty(a), _empty(b)


def _ewa_merge_setup(ctx, inputs, output):
    psi, a, b, scale = inputs
    ctx.save_for_backward(psi, a, b)
    ctx.scale = scale
    ctx.backend = requested_backend()


def _ewa_merge_bwd(ctx, grad_delta):
    psi, a, b = ctx.saved_tensors
    dpsi, da, db = torch.ops.lifelong._ewa_merge_backward(grad_delta, psi, a, b, ctx.scale, ctx.backend)
    return _keep_needed(ctx, (dpsi, da, db, None))


@_custom_op("lifelong::ewa_weights_rows")
def ewa_weights_rows(
    prompt: Tensor,
    concepts: Tensor,
    concept_rows: Tensor,
    prompt_mask: Tensor | None = None,
    power: float = 4.0,
    norm: str = "l1",
) -> Tensor:
    """EWA weights ψ from each concept's token rows: the released CIDM code's EWA (DESIGN §3.3).

    prompt: (B, L, T, D) the prompt's text embedding for each layer (ĉ^l);
    concepts: (L, G, W, D) per layer, the W token rows of each concept (padded to the most rows);
    concept_rows: (G, W) bool, the rows each concept has (at least one);
    prompt_mask: (B, T) bool, tokens that count; None = every position (BOS, words, EOS, padding),
    as the released code.
    Semantics: M[b,l,g] = mean over concept g's rows w of max_t cos(prompt[b,l,t], concepts[l,g,w]);
               psi[b,l,g] = M^power / ‖M[b,l,:]^power‖, norm "l1" (the released code, with power 4) or "fro".
    Unlike :func:`ewa_weights` (the max against each concept's mean embedding), each row is matched
    on its own and the matches are averaged. Returns psi (B, L, G). Differentiable in prompt and concepts.
    """
    checks.ewa_weights_rows(prompt, concepts, concept_rows, prompt_mask, power, norm, values=True)
    return _run("ewa_weights_rows", prompt, concepts, concept_rows, prompt_mask, power, norm)


@ewa_weights_rows.register_fake
def _(prompt, concepts, concept_rows, prompt_mask=None, power=4.0, norm="l1"):
    checks.ewa_weights_rows(prompt, concepts, concept_rows, prompt_mask, power, norm, values=False)
    return prompt.new_empty((prompt.shape[0], prompt.shape[1], concepts.shape[1]))


@_custom_op("lifelong::_ewa_weights_rows_backward")
def _ewa_weights_rows_backward(
    grad_psi: Tensor,
    prompt: Tensor,
    concepts: Tensor,
    concept_rows: Tensor,
    prompt_mask: Tensor | None,
    power: float,
    norm: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(dprompt, dconcepts); see reference.ewa_weights_rows_backward."""
    args = (grad_psi, prompt, concepts, concept_rows, prompt_mask, power, norm)
    return _run("ewa_weights_rows_backward", *args, backend=backend)


@_ewa_weights_rows_backward.register_fake
def _(grad_psi, prompt, concepts, concept_rows, prompt_mask, power, norm, backend):
    return _empty(prompt), _empty(concepts)


def _ewa_weights_rows_setup(ctx, inputs, output):
    prompt, concepts, concept_rows, prompt_mask, power, norm = inputs
    ctx.save_for_backward(prompt, concepts, concept_rows, prompt_mask)
    ctx.power, ctx.norm = power, norm
    ctx.backend = requested_backend()


def _ewa_weights_rows_bwd(ctx, grad_psi):
    prompt, concepts, concept_rows, prompt_mask = ctx.saved_tensors
    dprompt, dconcepts = torch.ops.lifelong._ewa_weights_rows_backward(
        grad_psi, prompt, concepts, concept_rows, prompt_mask, ctx.power, ctx.norm, ctx.backend
    )
    return _keep_needed(ctx, (dprompt, dconcepts, None, None, None, None))


ewa_weights_rows.register_autograd(_ewa_weights_rows_bwd, setup_context=_ewa_weights_rows_setup)
_ewa_merge.register_autograd(_ewa_merge_bwd, setup_context=_ewa_merge_setup)


# ---------------------------------------------------------------- trusted entries (generation hot path)
#
# The processors call these during denoising. Their index inputs (region ids, pool ids) were made and
# checked once when the generation's plan was built, so the value checks of the public ops, which read
# the data and so make the host wait for the device at every layer of every step, are skipped; the
# shape/dtype/device checks (no device reads) stay. Without autograd and outside torch.compile the
# backend runs directly, skipping the torch.library dispatch too.


@_custom_op("lifelong::_regional_cross_attention_trusted")
def _regional_cross_attention_trusted(
    q: Tensor, k: Tensor, v: Tensor, region_ids: Tensor, kv_len: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """regional_cross_attention without its value checks (region ids / kv_len checked by the caller)."""
    checks.regional_cross_attention(q, k, v, region_ids, kv_len, scale, values=False)
    return _run("regional_cross_attention", q, k, v, region_ids, kv_len, scale)


@_regional_cross_attention_trusted.register_fake
def _(q, k, v, region_ids, kv_len=None, scale=None):
    checks.regional_cross_attention(q, k, v, region_ids, kv_len, scale, values=False)
    return _empty(q)


_regional_cross_attention_trusted.register_autograd(_regional_backward, setup_context=_regional_setup)


def _needs_graph(*tensors: Tensor) -> bool:
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _differentiable_impl(op: str, args: tuple):
    """The selected backend's forward of ``op`` when autograd can run through its parts (the function
    has ``differentiable = True``, e.g. the torch backend's SDPA calls, whose own backward then runs),
    outside torch.compile; else None."""
    if torch.compiler.is_compiling():
        return None
    impl = backends.select(op, args)
    return impl if getattr(impl, "differentiable", False) else None


def regional_cross_attention_trusted(
    q: Tensor, k: Tensor, v: Tensor, region_ids: Tensor, kv_len: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """:func:`regional_cross_attention` for callers that checked region_ids and kv_len when they made them.
    With autograd on a backend whose forward is differentiable PyTorch (CPU: the torch backend), autograd
    runs through it (SDPA's own backward, no re-run of the forward) instead of the op's backward."""
    if _needs_graph(q, k, v):
        impl = _differentiable_impl("regional_cross_attention", (q, k, v, region_ids, kv_len, scale))
        if impl is None:
            return _regional_cross_attention_trusted(q, k, v, region_ids, kv_len, scale)
        checks.regional_cross_attention(q, k, v, region_ids, kv_len, scale, values=False)
        return impl(q, k, v, region_ids, kv_len, scale)
    checks.regional_cross_attention(q, k, v, region_ids, kv_len, scale, values=False)
    return _run("regional_cross_attention", q, k, v, region_ids, kv_len, scale)


@_custom_op("lifelong::_lora_term_trusted")
def _lora_term_trusted(x: Tensor, a: Tensor, b: Tensor, ids: Tensor, weights: Tensor, scale: float = 1.0) -> Tensor:
    """lora_term without its value checks (ids checked by the caller)."""
    checks.lora_term(x, a, b, ids, weights, scale, values=False)
    return _run("lora_term", x, a, b, ids, weights, scale)


@_lora_term_trusted.register_fake
def _(x, a, b, ids, weights, scale=1.0):
    checks.lora_term(x, a, b, ids, weights, scale, values=False)
    return x.new_empty((x.shape[0], x.shape[1], b.shape[1]))


_lora_term_trusted.register_autograd(_lora_term_bwd, setup_context=_lora_term_setup)


def lora_term_trusted(x: Tensor, a: Tensor, b: Tensor, ids: Tensor, weights: Tensor, scale: float = 1.0) -> Tensor:
    """:func:`lora_term` for callers that checked ids when they made them (the plan's pool ids)."""
    weights = weights.to(x.dtype)
    if _needs_graph(x, a, b, weights):
        return _lora_term_trusted(x, a, b, ids, weights, scale)
    checks.lora_term(x, a, b, ids, weights, scale, values=False)
    return _run("lora_term", x, a, b, ids, weights, scale)


def lora_kv_projection_grouped_trusted(
    c: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    douts: tuple[int, ...],
    a_k: list[Tensor],
    b_k: list[Tensor],
    a_v: list[Tensor],
    b_v: list[Tensor],
    ids: Tensor,
    weights: Tensor,
    scale: float = 1.0,
) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`lora_kv_projection_grouped` for callers that packed the frozen base weights once (w_k, w_v
    (ΣDout_l, Din), layer l's rows after those of layers < l; douts: each layer's Dout) and checked ids when
    they made them: no value checks (no host sync), no weight copy. c: (L, B, T, Din), or (B, T, Din) when
    every layer reads the same text. A backend that computes the layers with differentiable PyTorch ops
    (CPU: the torch backend) runs directly, under autograd too; the others run through the registered op
    and its backward (gradients of c, a, b and weights, only those needed) when autograd needs a graph.
    Returns ([k_l], [v_l]), each (B, T, Dout_l)."""
    douts = list(douts)
    args = (c, w_k, w_v, douts, a_k, b_k, a_v, b_v, ids, weights, scale)
    impl = None if torch.compiler.is_compiling() else backends.select("lora_kv_projection_grouped_packed", args)
    layers = getattr(impl, "layers", None)
    if layers is not None:
        return layers(*args)
    if c.dim() == 3:  # one text for every layer: the layer-major operand the other backends read
        c = c.expand(len(douts), *c.shape).contiguous()
    if torch.compiler.is_compiling():  # the registered op: traceable, with its fake and backward ops
        k, v = _lora_kv_projection_grouped_packed(c, w_k, w_v, douts, a_k, b_k, a_v, b_v, ids, weights, scale)
    elif _needs_graph(c, weights, *a_k, *b_k, *a_v, *b_v, w_k, w_v):
        k, v = _GroupedPackedFunction.apply(c, w_k, w_v, douts, ids, weights, scale, *a_k, *b_k, *a_v, *b_v)
    else:
        layers_k, layers_v = _layer_weights(w_k, w_v, douts)
        checks.lora_kv_projection_grouped(c, layers_k, layers_v, a_k, b_k, a_v, b_v, ids, weights, scale, values=False)
        k, v = _run("lora_kv_projection_grouped_packed", c, w_k, w_v, douts, a_k, b_k, a_v, b_v, ids, weights, scale)
    return reference.split_layers(k, c.shape[1], c.shape[2], douts), reference.split_layers(
        v, c.shape[1], c.shape[2], douts
    )


# ------------------------------------------------------------------ public functions

lora_kv_projection = _public("lora_kv_projection")
_lora_kv_projection_grouped_flat = _public("lora_kv_projection_grouped")


def lora_kv_projection_grouped(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale=1.0):
    k_all, v_all = _lora_kv_projection_grouped_flat(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale)
    douts = [w.shape[0] for w in w_k]
    return reference.split_layers(k_all, c.shape[1], c.shape[2], douts), reference.split_layers(
        v_all, c.shape[1], c.shape[2], douts
    )


lora_kv_projection_grouped.__doc__ = _lora_kv_projection_grouped.__doc__
lora_term = _public("lora_term")
regional_cross_attention = _public("regional_cross_attention")
ewa_weights = _public("ewa_weights")
ewa_merge = _public("ewa_merge")
