"""Every op (public op on the reference backend, and reference.py itself) against the naive
loops of DESIGN §3, over odd shapes, fp64 and fp32."""

import inputs
import naive_ops
import pytest
import torch

from lifelong_engine import ops, reference

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}
DTYPES = [torch.float64, torch.float32]
IMPLS = {"op": ops, "reference": reference}


@pytest.fixture(params=["op", "reference"])
def impl(request):
    return IMPLS[request.param]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [
        dict(B=1, T=1, Din=1, Dout=1, N=1, r=1, S=1),
        dict(B=2, T=5, Din=7, Dout=6, N=3, r=2, S=2),
        dict(B=3, T=77, Din=13, Dout=11, N=5, r=4, S=4),  # several adapters per sample, T = 77
        dict(B=2, T=3, Din=5, Dout=3, N=0, r=2, S=2),  # empty pool: every slot is -1
        dict(B=2, T=3, Din=5, Dout=3, N=2, r=3, S=0),  # no slots: base projection only
    ],
    ids=["ones", "small", "T77-S4", "N0", "S0"],
)
def test_lora_kv_projection(impl, shape, dtype):
    args = inputs.lora_kv(**shape, dtype=dtype)
    k, v = impl.lora_kv_projection(*args)
    k_ref, v_ref = naive_ops.lora_kv_projection(*args)
    torch.testing.assert_close(k, k_ref, **TOL[dtype])
    torch.testing.assert_close(v, v_ref, **TOL[dtype])


def test_lora_kv_empty_slot_ignores_adapter_contents():
    """An empty slot contributes nothing, even when adapter 0 holds NaN (no 0·NaN leak)."""
    c, w_k, w_v, a_k, b_k, a_v, b_v, _, weights, scale = inputs.lora_kv(N=2)
    a_k[0] = float("nan")
    ids = torch.tensor([[1, -1], [-1, -1]])
    k, v = ops.lora_kv_projection(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale)
    assert torch.isfinite(k).all() and torch.isfinite(v).all()
    torch.testing.assert_close(k[1], c[1] @ w_k.T)


def test_lora_kv_mixed_ranks_zero_padded():
    """A rank-1 adapter zero-padded to r = 3 in the pool gives the same K/V as unpadded."""
    c, w_k, w_v, a_k, b_k, a_v, b_v, _, weights, scale = inputs.lora_kv(N=2, r=3, S=2)
    for t in (a_k, a_v):
        t[1, 1:] = 0
    for t in (b_k, b_v):
        t[1, :, 1:] = 0
    ids = torch.tensor([[1, -1], [1, 1]])
    padded = ops.lora_kv_projection(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale)
    rank1 = naive_ops.lora_kv_projection(
        c, w_k, w_v, a_k[:, :1], b_k[:, :, :1], a_v[:, :1], b_v[:, :, :1], ids, weights, scale
    )
    for got, want in zip(padded, rank1):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,ragged",
    [
        (dict(B=1, H=1, N=1, d=1, P=1, T=1), False),
        (dict(B=2, H=3, N=7, d=5, P=1, T=77), True),  # P = 1: plain cross-attention
        (dict(B=2, H=2, N=11, d=8, P=2, T=5), True),
        (dict(B=1, H=2, N=13, d=4, P=5, T=77), True),
        (dict(B=3, H=1, N=5, d=3, P=5, T=7), False),
    ],
    ids=["ones", "P1-T77", "P2", "P5-T77", "P5-full"],
)
def test_regional_cross_attention(impl, shape, ragged, dtype):
    args = inputs.regional(**shape, dtype=dtype, ragged=ragged)
    torch.testing.assert_close(
        impl.regional_cross_attention(*args), naive_ops.regional_cross_attention(*args), **TOL[dtype]
    )


def test_regional_p1_equals_sdpa():
    q, k, v, region_ids, _, _ = inputs.regional(P=1, T=77, dtype=torch.float32)
    out = ops.regional_cross_attention(q, k, v, region_ids)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k[:, 0], v[:, 0]))


def test_regional_explicit_scale():
    args = inputs.regional(P=3)
    q, k, v, region_ids, kv_len, _ = args
    want = naive_ops.regional_cross_attention(q, k, v, region_ids, kv_len, 0.3)
    torch.testing.assert_close(ops.regional_cross_attention(q, k, v, region_ids, kv_len, scale=0.3), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,power", [("fro", 2.0), ("l1", 4.0), ("fro", 3.0)])
@pytest.mark.parametrize(
    "shape,masked",
    [
        (dict(B=1, L=1, T=1, D=1, G=1), False),
        (dict(B=2, L=3, T=6, D=5, G=4), True),
        (dict(B=3, L=2, T=77, D=13, G=7), True),
        (dict(B=2, L=2, T=4, D=3, G=0), True),  # G = 0: empty library
    ],
    ids=["ones", "small", "T77", "G0"],
)
def test_ewa_weights(impl, shape, masked, norm, power, dtype):
    prompt, concepts, mask = inputs.ewa(**shape, dtype=dtype, masked=masked)
    psi = impl.ewa_weights(prompt, concepts, mask, power=power, norm=norm)
    torch.testing.assert_close(psi, naive_ops.ewa_weights(prompt, concepts, mask, power, norm), **TOL[dtype])


def test_ewa_similarity_is_the_max_cosine_over_allowed_tokens():
    """reference.ewa_similarity (M, the diagnostics' view of EWA) against a loop over tokens in the test."""
    prompt, concepts, mask = inputs.ewa(B=2, L=3, T=6, D=5, G=4)
    m = reference.ewa_similarity(prompt, concepts, mask)
    for b in range(2):
        for layer in range(3):
            for g in range(4):
                want = max(
                    float(torch.nn.functional.cosine_similarity(prompt[b, layer, t], concepts[layer, g], dim=0))
                    for t in range(6)
                    if mask[b, t]
                )
                assert float(m[b, layer, g]) == pytest.approx(want, abs=1e-9)


def test_ewa_weights_padding_is_ignored():
    """Tokens outside prompt_mask cannot raise M, however similar they are to a concept."""
    prompt, concepts, _ = inputs.ewa(B=1, L=1, T=4, G=2, masked=False)
    prompt[0, 0, 3] = concepts[0, 0] * 10  # a padding token identical in direction to concept 0
    mask = torch.tensor([[True, True, True, False]])
    masked = ops.ewa_weights(prompt, concepts, mask)
    unmasked = ops.ewa_weights(prompt, concepts)
    assert unmasked[0, 0, 0] > masked[0, 0, 0]
    torch.testing.assert_close(masked, ops.ewa_weights(prompt[:, :, :3].contiguous(), concepts))


def test_ewa_weights_norms_are_unit():
    prompt, concepts, mask = inputs.ewa(G=6)
    fro = ops.ewa_weights(prompt, concepts, mask, norm="fro")
    l1 = ops.ewa_weights(prompt, concepts, mask, power=4.0, norm="l1")
    torch.testing.assert_close(fro.norm(dim=-1), torch.ones(fro.shape[:2], dtype=fro.dtype))
    torch.testing.assert_close(l1.abs().sum(-1), torch.ones(l1.shape[:2], dtype=l1.dtype))


def test_ewa_weights_zero_vectors_give_zero_not_nan():
    prompt, concepts, _ = inputs.ewa(G=3, masked=False)
    concepts = torch.zeros_like(concepts)
    psi = ops.ewa_weights(prompt, concepts)
    assert torch.equal(psi, torch.zeros_like(psi))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [dict(B=1, G=1, r=1, Din=1, Dout=1), dict(B=2, G=5, r=3, Din=7, Dout=11), dict(B=3, G=0, r=2, Din=5, Dout=3)],
    ids=["ones", "odd", "G0"],
)
def test_ewa_merge(impl, shape, dtype):
    psi, a, b, scale = inputs.merge(**shape, dtype=dtype)
    torch.testing.assert_close(impl.ewa_merge(psi, a, b, scale), naive_ops.ewa_merge(psi, a, b, scale), **TOL[dtype])


def test_ewa_merge_feeds_lora_kv_consistently():
    """Merging ψ-weighted adapters into W equals serving them as lora_kv weights (DESIGN §3.3)."""
    c, w_k, w_v, a_k, b_k, a_v, b_v, _, _, scale = inputs.lora_kv(B=2, N=4, S=4)
    psi = torch.rand(2, 4, dtype=c.dtype)
    ids = torch.arange(4).expand(2, 4)
    k, v = ops.lora_kv_projection(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, psi, scale)
    dk, dv = ops.ewa_merge(psi, a_k, b_k, scale), ops.ewa_merge(psi, a_v, b_v, scale)
    torch.testing.assert_close(k, torch.einsum("btd,bod->bto", c, w_k + dk))
    torch.testing.assert_close(v, torch.einsum("btd,bod->bto", c, w_v + dv))
