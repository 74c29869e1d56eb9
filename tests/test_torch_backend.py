"""The ``torch`` backend (fast plain PyTorch, the default for CPU tensors) against the reference:
forward and backward over odd shapes, fp64 and fp32, fp64 gradcheck through the ops,
kv_len edge cases, empty regions, masked values never reaching the output, skipped gradients."""

import inputs
import pytest
import torch
from torch.autograd import gradcheck

from lifelong_engine import BackendUnavailableError, backends, ops, reference, torch_backend

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}
DTYPES = [torch.float64, torch.float32]


def _close_all(got, want, dtype):
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, **TOL[dtype])


def _regional_case(B=2, H=2, N=9, d=8, P=3, T=5, dtype=torch.float64, lens=None, ids=None):
    ragged = lens == "random"
    q, k, v, region_ids, kv_len, _ = inputs.regional(B=B, H=H, N=N, d=d, P=P, T=T, dtype=dtype, ragged=ragged)
    if isinstance(lens, int):
        kv_len = torch.full((B, P), lens)
    if ids is not None:
        region_ids = ids
    return q, k, v, region_ids, kv_len, 0.37


REGIONAL_CASES = {
    "P1": dict(P=1),
    "P1-ragged": dict(P=1, B=3, lens="random"),
    "P1-one-key": dict(P=1, lens=1),
    "P3-ragged": dict(P=3, lens="random"),
    "P5-T77": dict(P=5, T=77, N=33, lens="random"),
    "odd-shapes": dict(B=1, H=3, N=1, d=3, P=2, T=2),
    "all-keys": dict(P=4, lens=5),
    "one-key": dict(P=3, lens=1),
    "empty-regions": dict(P=4, ids=torch.tensor([[0, 0, 3, 3, 0], [2, 2, 2, 2, 2]]), B=2, N=5),
    "no-queries": dict(P=3, N=0),
    "no-rows": dict(P=3, B=0),
    "one-slot-per-row": dict(P=3, ids=torch.tensor([[1] * 6, [0] * 6]), N=6, lens="random"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(REGIONAL_CASES))
def test_regional_matches_reference(case, dtype):
    args = _regional_case(dtype=dtype, **REGIONAL_CASES[case])
    grad = torch.randn_like(args[0])
    _close_all([torch_backend.regional_cross_attention(*args)], [reference.regional_cross_attention(*args)], dtype)
    got = torch_backend.regional_cross_attention_backward(grad, *args)
    _close_all(got, reference.regional_cross_attention_backward(grad, *args), dtype)


GRADCHECK_CASES = {  # small: every input element is perturbed through the public op
    "P1-ragged": dict(P=1, B=2, H=1, N=4, d=3, T=4, lens="random"),
    "P3-ragged": dict(P=3, B=2, H=1, N=6, d=3, T=4, lens="random"),
    "empty-regions": dict(P=4, H=1, d=3, T=3, ids=torch.tensor([[0, 0, 3, 3, 0], [2, 2, 2, 2, 2]]), B=2, N=5),
    "odd-shapes": REGIONAL_CASES["odd-shapes"],
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_regional_gradcheck(case):
    q, k, v, region_ids, kv_len, scale = _regional_case(**GRADCHECK_CASES[case])
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with ops.use_backend("torch"):
        assert gradcheck(lambda *x: ops.regional_cross_attention(*x, region_ids, kv_len, scale), leaves)


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_regional_trusted_entry_under_autograd(case):
    """The trusted entry runs the torch backend's forward under autograd (SDPA's own backward):
    gradcheck in fp64, and the same gradients as the reference's hand-written backward."""
    q, k, v, region_ids, kv_len, scale = _regional_case(**GRADCHECK_CASES[case])
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = ops.regional_cross_attention_trusted(*leaves, region_ids, kv_len, scale)
    assert "lifelong" not in type(out.grad_fn).__name__  # autograd through the parts, not the op
    grad = torch.randn_like(q)
    got = torch.autograd.grad(out, leaves, grad)
    _close_all(got, reference.regional_cross_attention_backward(grad, q, k, v, region_ids, kv_len, scale), q.dtype)
    assert gradcheck(lambda *x: ops.regional_cross_attention_trusted(*x, region_ids, kv_len, scale), leaves)


def test_regional_backward_under_autograd_is_linear_in_the_rows():
    """Autograd through the torch forward touches each row's gradient a few times: indexing a row
    (k[row]) would make its backward write a gradient the size of the whole batch per row and slot,
    so a training batch of B rows wrote B·P times the batch (a third of a TinyWorld base-training
    step). Counted as the elements every op of the backward outputs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Written(TorchDispatchMode):
        elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            leaves = torch.utils._pytree.tree_leaves(out)
            Written.elements += sum(t.numel() for t in leaves if isinstance(t, torch.Tensor))
            return out

    B, P = 16, 3
    q, k, v, _, _, scale = _regional_case(B=B, P=P, T=7, N=12, dtype=torch.float32)
    region_ids = torch.arange(12).remainder(P).expand(B, 12).contiguous()  # every row reads every slot
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = ops.regional_cross_attention_trusted(*leaves, region_ids, None, scale)
    grad = torch.randn_like(q)
    with Written():
        grads = torch.autograd.grad(out, leaves, grad)
    _close_all(grads, reference.regional_cross_attention_backward(grad, q, k, v, region_ids, None, scale), q.dtype)
    assert Written.elements <= 12 * sum(t.numel() for t in (q, k, v))


@pytest.mark.parametrize("P", [1, 3])
def test_regional_masked_keys_never_reach_the_output(P):
    """NaN/inf in keys and values past kv_len (or in slots no query reads) leave output and gradients finite."""
    q, k, v, _, _, scale = _regional_case(P=P, T=6, N=8)
    region_ids = torch.zeros(2, 8, dtype=torch.long)
    region_ids[:, 4:] = P - 1
    kv_len = torch.full((2, P), 3)
    k, v = k.clone(), v.clone()
    k[:, :, :, 3:], v[:, :, :, 3:] = float("inf"), float("nan")
    if P > 2:
        k[:, 1], v[:, 1] = float("nan"), float("nan")  # slot 1: no query reads it
    args = (q, k, v, region_ids, kv_len, scale)
    out = torch_backend.regional_cross_attention(*args)
    dq, dk, dv = torch_backend.regional_cross_attention_backward(torch.ones_like(q), *args)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert torch.isfinite(dk[:, :, :, :3]).all() and (dk[:, :, :, 3:] == 0).all()
    assert torch.isfinite(dv[:, :, :, :3]).all() and (dv[:, :, :, 3:] == 0).all()
    clean = [t.clone() for t in (k, v)]
    for t in clean:
        t[~torch.isfinite(t)] = 0.0
    torch.testing.assert_close(out, reference.regional_cross_attention(q, *clean, region_ids, kv_len, scale))


LORA_SHAPES = {
    "ones": dict(B=1, T=1, Din=1, Dout=1, N=1, r=1, S=1),
    "small": dict(B=2, T=5, Din=7, Dout=6, N=3, r=2, S=2),
    "T77-S4": dict(B=3, T=77, Din=13, Dout=11, N=5, r=4, S=4),
    "N0": dict(B=2, T=3, Din=5, Dout=3, N=0, r=2, S=2),
    "S0": dict(B=2, T=3, Din=5, Dout=3, N=2, r=3, S=0),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(LORA_SHAPES))
def test_lora_kv_matches_reference(shape, dtype):
    args = inputs.lora_kv(**LORA_SHAPES[shape], dtype=dtype)
    k, v = reference.lora_kv_projection(*args)
    _close_all(torch_backend.lora_kv_projection(*args), (k, v), dtype)
    gk, gv = torch.randn_like(k), torch.randn_like(v)
    got = torch_backend.lora_kv_projection_backward(gk, gv, *args)
    _close_all(got, reference.lora_kv_projection_backward(gk, gv, *args), dtype)


def _shared(args, ids):
    """lora_kv args whose rows all use the adapters ``ids`` (one row's list) with the same weights."""
    c, w_k, w_v, a_k, b_k, a_v, b_v, _, weights, scale = args
    bsz = c.shape[0]
    ids = torch.tensor(ids).expand(bsz, -1)
    weights = weights.detach()[:1, :1].expand(bsz, ids.shape[1]).clone() + torch.arange(ids.shape[1]) * 0.25
    return [c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale]


SHARED_IDS = {"one": [0], "repeat-and-empty": [2, -1, 2, 0], "all-empty": [-1, -1]}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ids", list(SHARED_IDS))
def test_lora_kv_shared_adapters_match_reference(ids, dtype):
    """Rows sharing adapters and weights (a training batch): the folded-weight path, forward and
    the backward with and without the weights' gradient."""
    args = _shared(inputs.lora_kv(B=3, N=3, S=2, dtype=dtype), SHARED_IDS[ids])
    k, v = reference.lora_kv_projection(*args)
    _close_all(torch_backend.lora_kv_projection(*args), (k, v), dtype)
    gk, gv = torch.randn_like(k), torch.randn_like(v)
    want = reference.lora_kv_projection_backward(gk, gv, *args)
    _close_all(torch_backend.lora_kv_projection_backward(gk, gv, *args), want, dtype)
    got = torch_backend.lora_kv_projection_backward(gk, gv, *args, needs=[True] * 5 + [False])
    _close_all(got[:5], want[:5], dtype)


@pytest.mark.parametrize("ids", list(SHARED_IDS))
def test_lora_kv_shared_adapters_gradcheck(ids):
    args = _shared(inputs.lora_kv(B=2, T=3, N=3, S=2), SHARED_IDS[ids])
    diff = [0, 3, 4, 5, 6]  # weights not differentiated: the folded-weight backward
    leaves = [args[i].requires_grad_() for i in diff]

    def run(*x):
        full = list(args)
        for i, t in zip(diff, x):
            full[i] = t
        return ops.lora_kv_projection(*full)

    with ops.use_backend("torch"):
        assert gradcheck(run, leaves)


@pytest.mark.parametrize("shape", ["small", "T77-S4", "N0"])
def test_lora_kv_gradcheck(shape):
    args = list(inputs.lora_kv(**{**LORA_SHAPES[shape], "T": 3}))
    diff = [0, 1, 2, 3, 4, 5, 6, 8]
    leaves = [args[i].requires_grad_() for i in diff]

    def run(*x):
        full = list(args)
        for i, t in zip(diff, x):
            full[i] = t
        return ops.lora_kv_projection(*full)

    with ops.use_backend("torch"):
        assert gradcheck(run, leaves)


def test_lora_kv_backward_computes_only_the_needed_gradients(backend_registry):
    """Frozen adapters and weights get no gradient work: the backward is told what is needed and
    its other outputs are zeros; the needed gradients equal the reference's."""
    seen = []

    def spy(*args, needs):
        seen.append(list(needs))
        return torch_backend.lora_kv_projection_backward(*args, needs=needs)

    spy.takes_needs = True
    impls = dict(backend_registry._registry["torch"].impls, lora_kv_projection_backward=spy)
    backend_registry.register_backend(backends.Backend("torch", impls, torch_backend.why_not, ("cpu",)))
    c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale = inputs.lora_kv(B=3, N=4, S=3)
    b_k.requires_grad_(), b_v.requires_grad_()  # only the up-projections train
    k, v = ops.lora_kv_projection(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale)
    gk, gv = torch.randn_like(k), torch.randn_like(v)
    got = torch.autograd.grad((k, v), (b_k, b_v), (gk, gv))
    assert seen == [[False, False, True, False, True, False]]
    want = reference.lora_kv_projection_backward(gk, gv, c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale)
    _close_all(got, (want[2], want[4]), torch.float64)
    skipped = torch_backend.lora_kv_projection_backward(
        gk, gv, c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale, needs=[False] * 5 + [True]
    )
    assert all((t == 0).all() for t in skipped[:5]) and (skipped[5] != 0).any()


CASES = {
    "lora_kv_projection": lambda: (ops.lora_kv_projection, inputs.lora_kv(dtype=torch.float32, grad=True)),
    "regional_cross_attention": lambda: (ops.regional_cross_attention, inputs.regional(P=3, grad=True)[:5]),
    "regional_P1": lambda: (ops.regional_cross_attention, inputs.regional(P=1, ragged=False, grad=True)[:5]),
    "ewa_weights": lambda: (ops.ewa_weights, inputs.ewa(grad=True)),
    "ewa_merge": lambda: (ops.ewa_merge, inputs.merge(grad=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck_on_torch_backend(case):
    op, args = CASES[case]()
    with ops.use_backend("torch"):
        torch.library.opcheck(getattr(torch.ops.lifelong, op.__name__).default, args)


def test_auto_uses_the_torch_backend_for_cpu_tensors():
    args = inputs.regional(dtype=torch.float32)
    assert backends.select("regional_cross_attention", args, "auto") is torch_backend.regional_cross_attention
    assert backends.select("ewa_merge", inputs.merge(), "auto") is reference.ewa_merge  # the reference's


def test_torch_backend_refuses_other_devices():
    args = inputs.regional(device="meta")
    with pytest.raises(BackendUnavailableError, match="tensors are on meta; it runs CPU tensors"):
        backends.select("regional_cross_attention", args, "torch")
