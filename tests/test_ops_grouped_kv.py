"""ops.lora_kv_projection_grouped (all layers' text K/V at once) against the per-layer reference, with a
different ψ (ids and weights) in every layer, on every backend; fake tensors and named errors."""

import pytest
import torch
from kernel_testing import CAN_RUN

from lifelong_engine import ops, reference

DOUTS = (6, 10, 4)
B, T, DIN, N, R, S = 2, 5, 8, 4, 3, 3


def grouped_args(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    c = randn(len(DOUTS), B, T, DIN)
    w_k, w_v = ([randn(d, DIN) for d in DOUTS] for _ in range(2))
    a_k, a_v = ([randn(N, R, DIN) for _ in DOUTS] for _ in range(2))
    b_k, b_v = ([randn(N, d, R) for d in DOUTS] for _ in range(2))
    # Each layer its own ids and ψ: a repeated id, an empty slot, an empty row, all slots used.
    ids = torch.tensor([[[2, -1, 2], [-1, 0, 3]], [[1, 3, 0], [-1, -1, -1]], [[0, -1, -1], [3, 2, 1]]])
    weights = (torch.rand(len(DOUTS), B, S, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, 0.75


def per_layer_reference(args):
    c, *lists, ids, weights, scale = (a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                      for a in args)  # fmt: skip
    lists = [[t.double() for t in lst] for lst in lists]
    return [
        reference.lora_kv_projection(c[l], *(lst[l] for lst in lists), ids[l], weights[l], scale)
        for l in range(c.shape[0])
    ]


BACKENDS = [
    ("reference", torch.float64),
    ("reference", torch.float32),
    ("torch", torch.float64),
    ("torch", torch.float32),
    pytest.param("triton", torch.float32, marks=pytest.mark.skipif(not CAN_RUN, reason="needs TRITON_INTERPRET=1")),
]


@pytest.mark.parametrize("backend, dtype", BACKENDS)
def test_matches_the_per_layer_reference_with_its_own_psi_per_layer(backend, dtype):
    args = grouped_args(dtype)
    with ops.use_backend(backend):
        ks, vs = ops.lora_kv_projection_grouped(*args)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    assert len(ks) == len(vs) == len(DOUTS)
    for layer, (want_k, want_v) in enumerate(per_layer_reference(args)):
        assert ks[layer].shape == (B, T, DOUTS[layer]) and ks[layer].dtype == dtype
        torch.testing.assert_close(ks[layer].double(), want_k, **tol)
        torch.testing.assert_close(vs[layer].double(), want_v, **tol)


def test_per_layer_psi_is_not_layer_0s():
    """The test above can fail: using layer 0's ids and weights everywhere gives other K/V."""
    args = grouped_args()
    c, *lists, ids, weights, scale = args
    shared = ops.lora_kv_projection_grouped(c, *lists, ids[:1].expand_as(ids), weights[:1].expand_as(weights), scale)
    per_layer = ops.lora_kv_projection_grouped(*args)
    assert not torch.allclose(shared[0][1], per_layer[0][1])


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_fake_tensors_and_schema(backend):
    with ops.use_backend(backend):
        torch.library.opcheck(
            torch.ops.lifelong.lora_kv_projection_grouped.default,
            grouped_args(),
            test_utils=("test_schema", "test_faketensor"),
        )


def test_bad_inputs_are_named():
    c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale = grouped_args()
    with pytest.raises(
        ValueError, match=r"lora_kv_projection_grouped: ids must be 3-D \[L, B, S\], got shape \(2, 3\)"
    ):
        ops.lora_kv_projection_grouped(c, w_k, w_v, a_k, b_k, a_v, b_v, ids[0], weights[0], scale)
    with pytest.raises(ValueError, match=r"lora_kv_projection_grouped: w_v has 2 layers; expected L = 3"):
        ops.lora_kv_projection_grouped(c, w_k, w_v[:2], a_k, b_k, a_v, b_v, ids, weights, scale)
    with pytest.raises(ValueError, match=r"lora_kv_projection_grouped: layer 1: lora_kv_projection: b_k"):
        bad = [b_k[0], b_k[1][:, :3], b_k[2]]
        ops.lora_kv_projection_grouped(c, w_k, w_v, a_k, bad, a_v, b_v, ids, weights, scale)
    with pytest.raises(ValueError, match=r"ids has values >= N = 4 \(max 9\)"):
        ops.lora_kv_projection_grouped(c, w_k, w_v, a_k, b_k, a_v, b_v, ids.index_fill(0, torch.tensor([2]), 9),
                                       weights, scale)  # fmt: skip
    with pytest.raises(TypeError, match="lora_kv_projection_grouped: w_k must be a list of torch.Tensor"):
        ops.lora_kv_projection_grouped(c, w_k[0], w_v, a_k, b_k, a_v, b_v, ids, weights, scale)


# ------------------------------------------------------------------------------ autograd (issue 15/18)

GRAD_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _flat(ks, vs):
    return torch.cat([t.reshape(-1) for t in (*ks, *vs)])


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_with_its_own_psi_per_layer(backend):
    """Gradients of c, one layer's a_k, another's b_v, the per-layer weights and one base weight, in fp64."""
    c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale = grouped_args()

    def f(c, a0, b1, wts, w0):
        return _flat(*ops.lora_kv_projection_grouped(
            c, [w0, *w_k[1:]], w_v, [a0, *a_k[1:]], b_k, a_v, [b_v[0], b1, b_v[2]], ids, wts, scale
        ))  # fmt: skip

    inputs = tuple(t.clone().requires_grad_() for t in (c, a_k[0], b_v[1], weights, w_k[0]))
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_opcheck_of_the_autograd_registration(backend):
    c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale = grouped_args()
    args = (c.requires_grad_(), w_k, w_v, [a.requires_grad_() for a in a_k], b_k, a_v, b_v, ids,
            weights.requires_grad_(), scale)  # fmt: skip
    with ops.use_backend(backend):
        torch.library.opcheck(torch.ops.lifelong.lora_kv_projection_grouped.default, args, test_utils=GRAD_UTILS)


def _packed(w_k, w_v):
    return torch.cat(w_k), torch.cat(w_v), [w.shape[0] for w in w_k]


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_the_trusted_packed_entry_equals_the_public_op_with_gradients(backend):
    c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale = grouped_args()
    pk, pv, douts = _packed(w_k, w_v)
    with ops.use_backend(backend):
        want = ops.lora_kv_projection_grouped(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale)
        got = ops.lora_kv_projection_grouped_trusted(c, pk, pv, douts, a_k, b_k, a_v, b_v, ids, weights, scale)
        torch.testing.assert_close(_flat(*got), _flat(*want), rtol=1e-12, atol=1e-12)

        def f(c, a2, wts, packed_k):  # with autograd: the trusted entry's autograd.Function (no op dispatch)
            return _flat(*ops.lora_kv_projection_grouped_trusted(
                c, packed_k, pv, douts, a_k, b_k, [*a_v[:2], a2], b_v, ids, wts, scale
            ))  # fmt: skip

        assert torch.autograd.gradcheck(
            f, tuple(t.clone().requires_grad_() for t in (c, a_v[2], weights, pk)), fast_mode=True
        )
        args = (c.requires_grad_(), pk, pv, douts, [a.requires_grad_() for a in a_k], b_k, a_v, b_v, ids, weights,
                scale)  # fmt: skip
        torch.library.opcheck(torch.ops.lifelong._lora_kv_projection_grouped_packed.default, args,
                              test_utils=GRAD_UTILS)  # fmt: skip


@pytest.mark.parametrize("one_text", [False, True], ids=["per-layer-text", "one-text"])
@pytest.mark.parametrize("ids_row", [[2, 0, -1], [1, 3, 1], [-1, -1, -1]], ids=["slots", "repeated", "none"])
def test_the_trusted_entry_of_a_training_step_runs_under_plain_autograd(one_text, ids_row):
    """A training step's text side: every row and layer uses the same adapters with the same weights (an
    empty slot, a repeated adapter, none at all), the factors train, the weights do not. On the torch backend
    autograd runs through its PyTorch ops (no custom backward node), also with one text for every layer
    (c (B, T, Din)), and values and gradients equal the per-layer reference."""
    c, w_k, w_v, a_k, b_k, a_v, b_v, _, _, scale = grouped_args()
    pk, pv, douts = _packed(w_k, w_v)
    ids = torch.tensor(ids_row).expand(len(DOUTS), B, S)
    weights = torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64).expand(len(DOUTS), B, S)
    text = c[0] if one_text else c

    def trusted(text, a0, b2, bv1):
        ks, vs = ops.lora_kv_projection_grouped_trusted(
            text, pk, pv, douts, [a0, *a_k[1:]], [*b_k[:2], b2], a_v, [b_v[0], bv1, b_v[2]], ids, weights, scale
        )
        return ks, vs

    inputs = tuple(t.clone().requires_grad_() for t in (text, a_k[0], b_k[2], b_v[1]))
    with ops.use_backend("torch"):
        ks, vs = trusted(*inputs)
        assert all("GroupedPacked" not in type(t.grad_fn).__name__ for t in (*ks, *vs))
        full = text.expand(len(DOUTS), *text.shape) if one_text else text
        want = per_layer_reference((full, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale))
        for k, v, (k_want, v_want) in zip(ks, vs, want):
            torch.testing.assert_close(k, k_want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(v, v_want, rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(lambda *t: _flat(*trusted(*t)), inputs, fast_mode=True)


def test_the_backward_computes_only_what_is_needed():
    """A frozen pool and weights (the text side of a step that trains only tokens): the per-layer backward
    is asked for dc alone, and a trained pool without trained weights does not compute dweights."""
    from lifelong_engine import torch_backend

    c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale = grouped_args()
    seen = []
    real = torch_backend.lora_kv_projection_backward

    def spy(*args, needs=None):
        seen.append(tuple(needs))
        return real(*args, needs=needs)

    try:
        torch_backend.lora_kv_projection_backward = spy
        with ops.use_backend("torch"):
            c1 = c.clone().requires_grad_()
            _flat(
                *ops.lora_kv_projection_grouped(c1, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale)
            ).sum().backward()
            a1 = [a.clone().requires_grad_() for a in a_k]
            _flat(
                *ops.lora_kv_projection_grouped(c, w_k, w_v, a1, b_k, a_v, b_v, ids, weights, scale)
            ).sum().backward()
    finally:
        torch_backend.lora_kv_projection_backward = real
    assert seen == [(True, False, False, False, False, False)] * 3 + [(False, True, False, False, False, False)] * 3


@pytest.mark.skipif(not CAN_RUN, reason="needs TRITON_INTERPRET=1")
def test_triton_backward_matches_the_reference():
    args = grouped_args(torch.float32)
    c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale = args
    grads = {}
    for backend in ("reference", "triton"):
        inputs = [c.clone().requires_grad_(), a_k[1].clone().requires_grad_(), weights.clone().requires_grad_()]
        with ops.use_backend(backend):
            ks, vs = ops.lora_kv_projection_grouped(
                inputs[0], w_k, w_v, [a_k[0], inputs[1], a_k[2]], b_k, a_v, b_v, ids, inputs[2], scale
            )
            (_flat(ks, vs) * torch.linspace(-1, 1, _flat(ks, vs).numel())).sum().backward()
        grads[backend] = [t.grad for t in inputs]
    for got, want in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
