"""Gradients of the ops: fp64 gradcheck through the registered ops, the hand-written
backward formulas in reference.py against autograd of the reference forwards, and
torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch)."""

import inputs
import pytest
import torch
from torch.autograd import gradcheck

from lifelong_engine import ops, reference


def _diff(args, names):
    """Only the named positions of args are differentiated; the others are closed over."""
    positions = [i for i, a in enumerate(args) if i in names]

    def fn(*diff):
        full = list(args)
        for i, t in zip(positions, diff):
            full[i] = t
        return full

    return fn, tuple(args[i] for i in positions)


# Which positional arguments each op is differentiable in.
LORA_DIFF = {0, 1, 2, 3, 4, 5, 6, 8}  # c, w_k, w_v, a_k, b_k, a_v, b_v, weights
REGIONAL_DIFF = {0, 1, 2}
EWA_DIFF = {0, 1}
MERGE_DIFF = {0, 1, 2}


@pytest.mark.parametrize("shape", [dict(N=3, S=2), dict(B=3, N=2, S=4, r=1), dict(N=0, S=2)], ids=["S2", "S4", "N0"])
def test_gradcheck_lora_kv(shape):
    args = inputs.lora_kv(**shape, T=3, grad=True)
    fn, diff = _diff(args, LORA_DIFF)
    assert gradcheck(lambda *d: ops.lora_kv_projection(*fn(*d)), diff)


@pytest.mark.parametrize("P,ragged", [(1, False), (3, True)])
def test_gradcheck_regional(P, ragged):
    args = inputs.regional(B=2, H=2, N=5, d=3, P=P, T=4, ragged=ragged, grad=True)
    fn, diff = _diff(args, REGIONAL_DIFF)
    assert gradcheck(lambda *d: ops.regional_cross_attention(*fn(*d)), diff)


@pytest.mark.parametrize("norm,power", [("fro", 2.0), ("l1", 4.0)])
def test_gradcheck_ewa_weights(norm, power):
    prompt, concepts, mask = inputs.ewa(T=4, grad=True)
    assert gradcheck(lambda p, c: ops.ewa_weights(p, c, mask, power=power, norm=norm), (prompt, concepts))


def test_gradcheck_ewa_merge():
    psi, a, b, scale = inputs.merge(grad=True)
    assert gradcheck(lambda p, x, y: ops.ewa_merge(p, x, y, scale), (psi, a, b))


def _autograd_grads(forward, args, diff_positions, grads_out):
    leaves = [a.detach().requires_grad_() if i in diff_positions else a for i, a in enumerate(args)]
    out = forward(*leaves)
    out = out if isinstance(out, tuple) else (out,)
    return torch.autograd.grad(out, [leaves[i] for i in sorted(diff_positions)], grads_out)


def test_reference_backward_lora_kv():
    args = inputs.lora_kv(B=3, N=4, S=3)
    gk, gv = torch.randn(3, 5, 6, dtype=torch.float64), torch.randn(3, 5, 6, dtype=torch.float64)
    dc, da_k, db_k, da_v, db_v, dw = reference.lora_kv_projection_backward(gk, gv, *args)
    want = _autograd_grads(reference.lora_kv_projection, args, {0, 3, 4, 5, 6, 8}, (gk, gv))
    for got, exp in zip((dc, da_k, db_k, da_v, db_v, dw), want):
        torch.testing.assert_close(got, exp)


def test_reference_backward_regional():
    args = inputs.regional(P=4, T=6)
    g = torch.randn_like(args[0])
    got = reference.regional_cross_attention_backward(g, *args)
    want = _autograd_grads(reference.regional_cross_attention, args, REGIONAL_DIFF, (g,))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("norm,power", [("fro", 2.0), ("l1", 4.0), ("fro", 3.0), ("fro", 1.5), ("l1", 1.0)])
def test_reference_backward_ewa_weights(norm, power):
    prompt, concepts, mask = inputs.ewa(G=5)
    g = torch.randn(prompt.shape[0], prompt.shape[1], concepts.shape[1], dtype=prompt.dtype)
    got = reference.ewa_weights_backward(g, prompt, concepts, mask, power, norm)
    want = _autograd_grads(
        lambda p, c: reference.ewa_weights(p, c, mask, power, norm), (prompt, concepts), EWA_DIFF, (g,)
    )
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


def test_reference_backward_ewa_merge():
    psi, a, b, scale = inputs.merge()
    g = torch.randn(psi.shape[0], b.shape[1], a.shape[2], dtype=a.dtype)
    got = reference.ewa_merge_backward(g, psi, a, b, scale)
    want = _autograd_grads(reference.ewa_merge, (psi, a, b, scale), MERGE_DIFF, (g,))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


def test_frozen_base_weights_get_no_gradient_work():
    """With only adapters trainable, the backward returns no gradient for the base weights."""
    c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale = inputs.lora_kv()
    a_k.requires_grad_()
    k, v = ops.lora_kv_projection(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale)
    (k.sum() + v.sum()).backward()
    assert a_k.grad is not None and w_k.grad is None and c.grad is None


OPCHECK_CASES = {
    "lora_kv_projection": lambda: (ops.lora_kv_projection, inputs.lora_kv(grad=True), {}),
    "lora_kv_projection-fp32": lambda: (ops.lora_kv_projection, inputs.lora_kv(dtype=torch.float32, grad=True), {}),
    "regional_cross_attention": lambda: (ops.regional_cross_attention, inputs.regional(grad=True)[:5], {}),
    "regional_cross_attention-scale": lambda: (
        ops.regional_cross_attention,
        inputs.regional(grad=True, ragged=False)[:4],
        {"scale": 0.5},
    ),
    "ewa_weights": lambda: (ops.ewa_weights, inputs.ewa(grad=True), {"power": 4.0, "norm": "l1"}),
    "ewa_weights-nomask": lambda: (ops.ewa_weights, inputs.ewa(grad=True, masked=False)[:2], {}),
    "ewa_merge": lambda: (ops.ewa_merge, inputs.merge(grad=True), {}),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case):
    op, args, kwargs = OPCHECK_CASES[case]()
    torch.library.opcheck(getattr(torch.ops.lifelong, op.__name__).default, args, kwargs)


def test_torch_compile_fullgraph():
    """The ops trace as single nodes (fake implementations) and run compiled."""
    args = inputs.regional(dtype=torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v, region_ids, kv_len):
        return ops.regional_cross_attention(q, k, v, region_ids, kv_len) * 2

    torch.testing.assert_close(f(*args[:5]), 2 * ops.regional_cross_attention(*args[:5]))
