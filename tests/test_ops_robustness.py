"""The ops under hostile inputs (issue 13): negative similarities in EWA, NaN behind kv_len, mistyped
scalars, and a hypothesis fuzz of every op against the naive loops of tests/naive_ops.py, on the
reference and the Triton backend (Triton's interpreter on CPU), with odd shapes and strided inputs."""

import inputs
import naive_ops
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_testing import CAN_RUN, DEVICE
from torch.autograd import gradcheck

from lifelong_engine import ops

BACKENDS = [
    "reference",
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not CAN_RUN, reason="no Triton here")),
]


def _dtype(backend: str) -> torch.dtype:
    return torch.float64 if backend != "triton" else torch.float32  # Triton kernels: no fp64


# ---------------------------------------------------------------- row 11: EWA with negative similarities


def _anti_aligned(dtype):
    """Every prompt token near +u; concept 0 is −u (M ≈ −1), concept 1 is +u, concept 2 orthogonal-ish."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(8, generator=g, dtype=torch.float64)
    u /= u.norm()
    prompt = u + 0.1 * torch.randn(2, 3, 4, 8, generator=g, dtype=torch.float64)
    w = torch.randn(8, generator=g, dtype=torch.float64)
    w -= (w @ u) * u
    concepts = torch.stack([-u, u, w + 0.05 * u]).expand(3, 3, 8).clone()
    return prompt.to(DEVICE, dtype), concepts.to(DEVICE, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["fro", "l1"])
@pytest.mark.parametrize("power", [0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
def test_ewa_negative_similarity_weighs_zero(backend, norm, power):
    """Issue 13 row 11: power 1.5 gave an all-NaN ψ row, power 1 a negative weight. A concept no token
    points towards weighs 0 for every power; ψ stays finite and non-negative."""
    prompt, concepts = _anti_aligned(_dtype(backend))
    with ops.use_backend(backend):
        psi = ops.ewa_weights(prompt, concepts, power=power, norm=norm)
    assert torch.isfinite(psi).all() and (psi >= 0).all()
    assert (psi[..., 0] == 0).all() and (psi[..., 1] > 0).all()
    want = naive_ops.ewa_weights(prompt.double().cpu(), concepts.double().cpu(), None, power, norm)
    torch.testing.assert_close(psi.double().cpu(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ewa_every_similarity_negative_gives_a_zero_row(backend):
    prompt, concepts = _anti_aligned(_dtype(backend))
    anti = concepts[:, :1].expand(3, 2, 8)  # both concepts −u: every similarity ≈ −1
    with ops.use_backend(backend):
        psi = ops.ewa_weights(prompt, anti, power=1.5)
    assert (psi == 0).all()


@pytest.mark.parametrize("power", [0.5, 1.0, 1.5, 3.0])
def test_ewa_gradient_through_negative_similarities(power):
    """The gradient of a concept clamped at M ≤ 0 is 0, finite for every power (gradcheck, fp64)."""
    prompt, concepts = _anti_aligned(torch.float64)
    prompt, concepts = prompt[:1, :2].cpu().requires_grad_(), concepts[:2].cpu().requires_grad_()
    with ops.use_backend("reference"):
        assert gradcheck(lambda p, c: ops.ewa_weights(p, c, power=power), (prompt, concepts))


@pytest.mark.parametrize("power", [0.0, -1.0, float("nan"), float("inf")])
def test_ewa_power_must_be_finite_and_positive(power):
    prompt, concepts = _anti_aligned(torch.float64)
    with pytest.raises(ValueError, match="power must be a finite number"):
        ops.ewa_weights(prompt, concepts, power=power)


# --------------------------------------------------------------------- row 12: NaN behind kv_len


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", ["k", "v", "both"])
def test_values_behind_kv_len_never_reach_the_output(backend, poison):
    """Issue 13 row 12: a NaN in v beyond kv_len of slot 0 turned every output NaN. Keys and values
    ≥ kv_len do not count: the output and the gradients equal those with zeros stored there."""
    q, k, v, region_ids, _, _ = inputs.regional(B=2, H=2, N=11, d=8, P=3, T=20, dtype=_dtype(backend), device=DEVICE)
    kv_len = torch.tensor([[3, 20, 5], [7, 1, 17]], device=DEVICE)
    behind = (torch.arange(20, device=DEVICE) >= kv_len[:, :, None])[:, :, None, :, None].expand_as(k)
    clean_k, clean_v = k.masked_fill(behind, 0), v.masked_fill(behind, 0)
    bad_k = clean_k.masked_fill(behind, float("nan")) if poison in ("k", "both") else clean_k
    bad_v = clean_v.masked_fill(behind, float("inf") if poison == "both" else float("nan"))
    bad_v = bad_v if poison in ("v", "both") else clean_v
    grad = torch.randn_like(q)

    def run(k, v):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        with ops.use_backend(backend):
            out = ops.regional_cross_attention(*leaves, region_ids, kv_len)
            out.backward(grad)
        return [out, *(x.grad for x in leaves)]

    got, want = run(bad_k, bad_v), run(clean_k, clean_v)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(x).all(), f"{name} has NaN/inf"
        torch.testing.assert_close(x, y, msg=name)
    assert (got[2][behind] == 0).all() and (got[3][behind] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_tokens_never_reach_ewa_weights_or_their_gradients(backend):
    """Tokens outside prompt_mask do not count: a NaN stored there reached the gradient of every concept."""
    prompt, concepts, _ = inputs.ewa(B=2, T=6, dtype=_dtype(backend), device=DEVICE, masked=False)
    mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 5 + [False]], device=DEVICE)
    clean = prompt.masked_fill(~mask[:, None, :, None], 0)
    grad = torch.rand(2, prompt.shape[1], concepts.shape[1], dtype=prompt.dtype, device=DEVICE)

    def run(p):
        p, c = p.clone().requires_grad_(), concepts.clone().requires_grad_()
        with ops.use_backend(backend):
            psi = ops.ewa_weights(p, c, mask, power=1.5)
            psi.backward(grad)
        return psi, p.grad, c.grad

    got, want = run(clean.masked_fill(~mask[:, None, :, None], float("nan"))), run(clean)
    for name, x, y in zip(("psi", "dprompt", "dconcepts"), got, want):
        assert torch.isfinite(x).all(), f"{name} has NaN/inf"
        torch.testing.assert_close(x, y, msg=name)


# ------------------------------------------------------------- row 15: mistyped arguments, overflowing scalars


def _lora(**kw):
    args = dict(zip(["c", "w_k", "w_v", "a_k", "b_k", "a_v", "b_v", "ids", "weights", "scale"], inputs.lora_kv()))
    return ops.lora_kv_projection, {**args, **kw}


def _regional(**kw):
    return ops.regional_cross_attention, {
        **dict(zip(["q", "k", "v", "region_ids", "kv_len", "scale"], inputs.regional())),
        **kw,
    }


def _ewa(**kw):
    return ops.ewa_weights, {**dict(zip(["prompt", "concepts", "prompt_mask"], inputs.ewa())), **kw}


def _merge(**kw):
    return ops.ewa_merge, {**dict(zip(["psi", "a", "b", "scale"], inputs.merge())), **kw}


MISTYPED = {  # case → (call, the start of the TypeError's message)
    "lora scale str": (lambda: _lora(scale="2"), "lora_kv_projection: scale must be a real number, got str '2'"),
    "lora scale None": (lambda: _lora(scale=None), "lora_kv_projection: scale must be a real number, got NoneType"),
    "lora scale bool": (lambda: _lora(scale=True), "lora_kv_projection: scale must be a real number, got bool"),
    "lora scale tensor": (lambda: _lora(scale=torch.tensor(2.0)), "lora_kv_projection: scale must be a real number"),
    "lora c list": (lambda: _lora(c=[[1.0]]), "lora_kv_projection: c must be a torch.Tensor, got list"),
    "lora ids None": (lambda: _lora(ids=None), "lora_kv_projection: ids must be a torch.Tensor, got NoneType"),
    "regional scale str": (lambda: _regional(scale="0.5"), "regional_cross_attention: scale must be a real number or"),
    "regional kv_len list": (lambda: _regional(kv_len=[[1]]), "regional_cross_attention: kv_len must be a torch"),
    "regional q numpy": (lambda: _regional(q=inputs.regional()[0].numpy()), "regional_cross_attention: q must be"),
    "ewa norm None": (lambda: _ewa(norm=None), "ewa_weights: norm must be a string, got NoneType"),
    "ewa norm int": (lambda: _ewa(norm=2), "ewa_weights: norm must be a string, got int 2"),
    "ewa power str": (lambda: _ewa(power="2"), "ewa_weights: power must be a real number, got str"),
    "ewa power None": (lambda: _ewa(power=None), "ewa_weights: power must be a real number, got NoneType"),
    "ewa mask int": (lambda: _ewa(prompt_mask=3), "ewa_weights: prompt_mask must be a torch.Tensor or None, got int"),
    "merge scale str": (lambda: _merge(scale="1"), "ewa_merge: scale must be a real number, got str"),
    "merge psi list": (lambda: _merge(psi=[0.5]), "ewa_merge: psi must be a torch.Tensor, got list"),
}  # fmt: skip


@pytest.mark.parametrize("case", MISTYPED)
def test_mistyped_arguments_raise_a_type_error_naming_them(case):
    """Issue 13 row 15: these raised torch's schema RuntimeError, which names no argument."""
    make, message = MISTYPED[case]
    op, kwargs = make()
    with pytest.raises(TypeError) as info:
        op(**kwargs)
    assert str(info.value).startswith(message), str(info.value)


def _cast(make, dtype, **changes):
    """make()'s op and arguments, the floating-point tensors cast to dtype, then changes applied."""
    op, args = make()
    args = {n: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t for n, t in args.items()}
    return op, {**args, **changes}


OVERFLOWING = {  # a finite scalar the op's dtype cannot hold: the op would compute with inf
    "ewa power fp16": (lambda: _cast(_ewa, torch.float16, power=1e308), "power"),
    "ewa power fp32": (lambda: _cast(_ewa, torch.float32, power=1e39), "power"),
    "lora scale fp16": (lambda: _cast(_lora, torch.float16, scale=1e6), "scale"),
    "regional scale fp16": (lambda: _cast(_regional, torch.float16, scale=-7e4), "scale"),
    "merge scale fp32": (lambda: _cast(_merge, torch.float32, scale=1e300), "scale"),
}


@pytest.mark.parametrize("case", OVERFLOWING)
def test_scalars_that_overflow_the_dtype_raise_naming_them(case):
    make, name = OVERFLOWING[case]
    op, kwargs = make()
    with pytest.raises(ValueError, match=rf"{op.__name__}: {name}=\S+ does not fit in torch.float"):
        op(**kwargs)


def test_numpy_and_integer_scalars_are_accepted():
    import numpy as np

    op, kwargs = _ewa(power=np.float32(2.0))
    torch.testing.assert_close(op(**kwargs), op(**{**kwargs, "power": 2.0}))
    op, kwargs = _merge(scale=2)
    torch.testing.assert_close(op(**kwargs), op(**{**kwargs, "scale": 2.0}))


# -------------------------------------------------------------------------- fuzz against the naive loops

FUZZ = settings(
    max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)
fuzz_backend = st.sampled_from(["reference", "torch", "triton"] if CAN_RUN else ["reference", "torch"])


def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout: contiguous, last two dims transposed in memory, or
    every other element of a wider buffer (a non-unit stride in the last dim)."""
    if how == "transposed" and t.ndim >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


layouts = st.sampled_from(["contiguous", "transposed", "strided"])
TOL = {torch.float64: dict(rtol=1e-7, atol=1e-9), torch.float32: dict(rtol=2e-4, atol=2e-5)}


@FUZZ
@given(
    backend=fuzz_backend,
    fp64=st.booleans(),
    shape=st.tuples(*(st.integers(1, n) for n in (3, 5, 9, 6, 4, 3, 3))),
    scale=st.floats(-4, 4, allow_nan=False),
    layout=layouts,
    seed=st.integers(0, 2**16),
)
def test_fuzz_lora_kv_projection(backend, fp64, shape, scale, layout, seed):
    B, T, Din, Dout, N, r, S = shape
    dtype = torch.float64 if fp64 and backend != "triton" else torch.float32
    torch.manual_seed(seed)
    args = list(inputs.lora_kv(B=B, T=T, Din=Din, Dout=Dout, N=N, r=r, S=S, dtype=dtype, device=DEVICE))
    args[7] = torch.randint(-1, N, (B, S), device=DEVICE)  # empty slots and repeats anywhere
    args = [_strided(a, layout) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    with ops.use_backend(backend):
        k, v = ops.lora_kv_projection(*args[:9], scale)
    want_k, want_v = naive_ops.lora_kv_projection(*(a.cpu() if torch.is_tensor(a) else a for a in args[:9]), scale)
    torch.testing.assert_close(k.cpu(), want_k, **TOL[dtype])
    torch.testing.assert_close(v.cpu(), want_v, **TOL[dtype])


@FUZZ
@given(
    backend=fuzz_backend,
    fp64=st.booleans(),
    shape=st.tuples(*(st.integers(1, n) for n in (2, 3, 13, 9, 4, 24))),
    scale=st.one_of(st.none(), st.floats(0.01, 2)),
    ragged=st.booleans(),
    layout=layouts,
    seed=st.integers(0, 2**16),
)
def test_fuzz_regional_cross_attention(backend, fp64, shape, scale, ragged, layout, seed):
    B, H, N, d, P, T = shape
    dtype = torch.float64 if fp64 and backend != "triton" else torch.float32
    torch.manual_seed(seed)
    q, k, v, region_ids, kv_len, _ = inputs.regional(B=B, H=H, N=N, d=d, P=P, T=T, dtype=dtype, device=DEVICE)
    kv_len = kv_len if ragged else None
    if kv_len is not None:  # whatever lies behind kv_len must not matter
        behind = (torch.arange(T, device=DEVICE) >= kv_len[:, :, None])[:, :, None, :, None].expand_as(k)
        k, v = k.masked_fill(behind, float("nan")), v.masked_fill(behind, float("-inf"))
    q, k, v = (_strided(x, layout) for x in (q, k, v))
    with ops.use_backend(backend):
        out = ops.regional_cross_attention(q, k, v, region_ids, kv_len, scale)
    want = naive_ops.regional_cross_attention(
        q.cpu(), k.cpu(), v.cpu(), region_ids.cpu(), None if kv_len is None else kv_len.cpu(), scale
    )
    torch.testing.assert_close(out.cpu(), want, **TOL[dtype])


@FUZZ
@given(
    backend=fuzz_backend,
    fp64=st.booleans(),
    shape=st.tuples(*(st.integers(1, n) for n in (3, 3, 7, 9, 6))),
    power=st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 4.0]),
    norm=st.sampled_from(["fro", "l1"]),
    masked=st.booleans(),
    layout=layouts,
    seed=st.integers(0, 2**16),
)
def test_fuzz_ewa_weights(backend, fp64, shape, power, norm, masked, layout, seed):
    B, L, T, D, G = shape
    dtype = torch.float64 if fp64 and backend != "triton" else torch.float32
    torch.manual_seed(seed)
    prompt, concepts, mask = inputs.ewa(B=B, L=L, T=T, D=D, G=G, dtype=dtype, device=DEVICE, masked=masked)
    prompt, concepts = _strided(prompt, layout), _strided(concepts, layout)
    with ops.use_backend(backend):
        psi = ops.ewa_weights(prompt, concepts, mask, power=power, norm=norm)
    assert torch.isfinite(psi).all() and (psi >= 0).all()
    want = naive_ops.ewa_weights(prompt.cpu(), concepts.cpu(), None if mask is None else mask.cpu(), power, norm)
    torch.testing.assert_close(psi.cpu(), want, **TOL[dtype])


@FUZZ
@given(
    backend=fuzz_backend,
    fp64=st.booleans(),
    shape=st.tuples(*(st.integers(1, n) for n in (3, 5, 4, 9, 7))),
    scale=st.floats(-4, 4, allow_nan=False),
    layout=layouts,
    seed=st.integers(0, 2**16),
)
def test_fuzz_ewa_merge(backend, fp64, shape, scale, layout, seed):
    B, G, r, Din, Dout = shape
    dtype = torch.float64 if fp64 and backend != "triton" else torch.float32
    torch.manual_seed(seed)
    psi, a, b, _ = inputs.merge(B=B, G=G, r=r, Din=Din, Dout=Dout, dtype=dtype, device=DEVICE)
    psi, a, b = (_strided(x, layout) for x in (psi, a, b))
    with ops.use_backend(backend):
        delta = ops.ewa_merge(psi, a, b, scale)
    torch.testing.assert_close(delta.cpu(), naive_ops.ewa_merge(psi.cpu(), a.cpu(), b.cpu(), scale), **TOL[dtype])


# ------------------------------------------------------------------------------ empty dimensions

EMPTY = {  # every dimension that may be 0, one at a time: the ops return empty or zero-concept results
    **{f"lora {k}=0": ("lora", {k: 0}) for k in ("B", "T", "Dout", "N", "r", "S")},
    **{f"regional {k}=0": ("regional", {k: 0}) for k in ("B", "H", "N")},
    **{f"ewa {k}=0": ("ewa", {k: 0}) for k in ("B", "L", "D", "G")},
    **{f"merge {k}=0": ("merge", {k: 0}) for k in ("B", "G", "r", "Din", "Dout")},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", EMPTY)
def test_empty_dimensions_match_the_naive_loops(backend, case):
    kind, sizes = EMPTY[case]
    dtype = _dtype(backend)
    if kind == "lora":
        args = inputs.lora_kv(dtype=dtype, device=DEVICE, empty=sizes.get("B") != 0, **sizes)
        op, naive = ops.lora_kv_projection, naive_ops.lora_kv_projection
    elif kind == "regional":
        args = inputs.regional(dtype=dtype, device=DEVICE, **sizes)[:5]
        op, naive = ops.regional_cross_attention, naive_ops.regional_cross_attention
    elif kind == "ewa":
        args = inputs.ewa(dtype=dtype, device=DEVICE, masked=False, **sizes)
        op, naive = ops.ewa_weights, naive_ops.ewa_weights
    else:
        args = inputs.merge(dtype=dtype, device=DEVICE, **sizes)
        op, naive = ops.ewa_merge, naive_ops.ewa_merge
    with ops.use_backend(backend):
        got = op(*args)
    want = naive(*(a.cpu() if torch.is_tensor(a) else a for a in args))
    for x, y in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(x.cpu(), y, **TOL[dtype])


def test_a_zero_head_dim_is_refused_by_name():
    """d = 0 raised ZeroDivisionError computing the default scale d**-0.5."""
    q, k, v, region_ids, kv_len, _ = inputs.regional(d=0)
    with pytest.raises(ValueError, match=r"regional_cross_attention: q has shape \(2, 2, 9, 0\); need a head dim"):
        ops.regional_cross_attention(q, k, v, region_ids, kv_len)
