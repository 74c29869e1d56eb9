"""ops.lora_term (image-side LoRA: to_q, to_out.0) against the naive loop, its gradients, fake tensors and
checks; the processors' unchecked entry gives the same values."""

import pytest
import torch
from inputs import lora_kv
from naive_ops import lora_kv_projection as naive_kv

from lifelong_engine import ops


def args(dtype=torch.float64, grad=False):
    c, w_k, _, a_k, b_k, _, _, ids, weights, scale = lora_kv(dtype=dtype, grad=grad)
    return c, a_k, b_k, ids, weights, scale, w_k


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_the_naive_loop(dtype):
    x, a, b, ids, weights, scale, w = args(dtype)
    k, _ = naive_kv(x, torch.zeros_like(w), torch.zeros_like(w), a, b, a, b, ids, weights, scale)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ops.lora_term(x, a, b, ids, weights, scale), k, atol=tol, rtol=tol)
    torch.testing.assert_close(ops.lora_term_trusted(x, a, b, ids, weights, scale), k, atol=tol, rtol=tol)


def test_gradients_and_fake_tensors():
    x, a, b, ids, weights, scale, _ = args(grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b, w: ops.lora_term(x, a, b, ids, w, scale), (x, a, b, weights))
    assert torch.autograd.gradcheck(
        lambda x, a, b, w: ops.lora_term_trusted(x, a, b, ids, w, scale), (x, a, b, weights)
    )
    torch.library.opcheck(torch.ops.lifelong.lora_term.default, (x, a, b, ids, weights, scale))


def test_bad_ids_and_shapes_are_named():
    x, a, b, ids, weights, scale, _ = args()
    with pytest.raises(ValueError, match=r"lora_term: ids has values in \[.*\]; expected -1 \(empty\)"):
        ops.lora_term(x, a, b, ids + 5, weights, scale)
    with pytest.raises(ValueError, match="lora_term: b has shape .* dim 2 must be"):
        ops.lora_term(x, a, b[..., :1], ids, weights, scale)
