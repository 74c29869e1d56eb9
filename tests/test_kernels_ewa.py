"""Triton EWA kernels (ewa_weights, ewa_merge) through the public ops on the triton backend."""

import inputs
import naive_ops
import pytest
import torch
from kernel_testing import DEVICE, assert_flash_close, requires_triton

from lifelong_engine import ops, reference

pytestmark = requires_triton

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,power", [("fro", 2.0), ("l1", 4.0), ("fro", 3.0)])
@pytest.mark.parametrize(
    "shape,masked",
    [
        (dict(B=1, L=1, T=1, D=1, G=1), False),
        (dict(B=2, L=3, T=77, D=13, G=7), True),
        (dict(B=2, L=2, T=130, D=70, G=67), True),  # several T, D and G tiles
        (dict(B=2, L=2, T=4, D=3, G=0), True),
    ],
    ids=["ones", "T77", "tiles", "G0"],
)
def test_ewa_weights(shape, masked, norm, power, dtype):
    prompt, concepts, mask = inputs.ewa(**shape, dtype=dtype, masked=masked, device=DEVICE)
    with ops.use_backend("triton"):
        psi = ops.ewa_weights(prompt, concepts, mask, power=power, norm=norm)
    want = naive_ops.ewa_weights(prompt.double().cpu(), concepts.double().cpu(), mask, power, norm)
    assert psi.dtype == dtype
    torch.testing.assert_close(psi.cpu().double(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [dict(B=1, G=1, r=1, Din=1, Dout=1), dict(B=2, G=5, r=3, Din=70, Dout=11), dict(B=3, G=20, r=4, Din=33, Dout=65)],
    ids=["ones", "odd", "tiles"],
)
def test_ewa_merge(shape, dtype):
    psi, a, b, scale = inputs.merge(**shape, dtype=dtype, device=DEVICE)
    with ops.use_backend("triton"):
        delta = ops.ewa_merge(psi, a, b, scale)
    ref32 = reference.ewa_merge(psi.float(), a.float(), b.float(), scale)
    assert delta.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(delta, ref32, **TOL[dtype])
    else:
        assert_flash_close(delta, ref32, reference.ewa_merge(psi, a.float(), b.float(), scale).to(dtype), atol=1e-3)


def test_ewa_merge_empty_library_is_zero():
    psi, a, b, scale = inputs.merge(G=0, dtype=torch.float32, device=DEVICE)
    with ops.use_backend("triton"):
        delta = ops.ewa_merge(psi, a, b, scale)
    assert delta.shape == (2, 5, 7) and not delta.any()


def test_backward_through_triton_backend():
    psi, a, b, scale = inputs.merge(dtype=torch.float32, device=DEVICE, grad=True)
    with ops.use_backend("triton"):
        ops.ewa_merge(psi, a, b, scale).square().sum().backward()
    grads = [t.grad for t in (psi, a, b)]
    for t in (psi, a, b):
        t.grad = None
    reference.ewa_merge(psi, a, b, scale).square().sum().backward()
    for got, t in zip(grads, (psi, a, b)):
        torch.testing.assert_close(got, t.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_sd15_shapes(dtype):
    """16 layers × 1000 concepts at SD-1.5 text width; psi vs fp32 (FlashAttention's rule)."""
    prompt, concepts, mask = inputs.ewa(B=2, L=16, T=77, D=768, G=1000, dtype=dtype, device="cuda")
    with ops.use_backend("triton"):
        psi = ops.ewa_weights(prompt, concepts, mask)
    ref32 = reference.ewa_weights(prompt.float(), concepts.float(), mask)
    assert_flash_close(psi, ref32, reference.ewa_weights(prompt, concepts, mask), atol=1e-4)
    psi2, a, b, scale = inputs.merge(B=2, G=1000, r=4, Din=768, Dout=320, dtype=dtype, device="cuda")
    with ops.use_backend("triton"):
        delta = ops.ewa_merge(psi2, a, b, scale)
    ref32 = reference.ewa_merge(psi2.float(), a.float(), b.float(), scale)
    assert_flash_close(delta, ref32, reference.ewa_merge(psi2, a, b, scale), atol=1e-3)
