"""The public ops on the triton backend: torch.library.opcheck (schema, fake tensors, autograd
registration, AOT dispatch) and forward/backward against the reference through the op."""

import inputs
import pytest
import torch
from kernel_testing import DEVICE, requires_triton

from lifelong_engine import ops

pytestmark = requires_triton

CASES = {
    "lora_kv_projection": lambda: (
        ops.lora_kv_projection,
        inputs.lora_kv(dtype=torch.float32, device=DEVICE, grad=True),
    ),
    "regional_cross_attention": lambda: (
        ops.regional_cross_attention,
        inputs.regional(P=3, T=77, dtype=torch.float32, device=DEVICE, grad=True)[:5],
    ),
    "ewa_weights": lambda: (ops.ewa_weights, inputs.ewa(dtype=torch.float32, device=DEVICE, grad=True)),
    "ewa_merge": lambda: (ops.ewa_merge, inputs.merge(dtype=torch.float32, device=DEVICE, grad=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck_on_triton(case):
    op, args = CASES[case]()
    with ops.use_backend("triton"):
        torch.library.opcheck(getattr(torch.ops.lifelong, op.__name__).default, args)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_match_reference(case):
    op, args = CASES[case]()
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def run(backend):
        for t in leaves:
            t.grad = None
        with ops.use_backend(backend):
            out = op(*args)
        out = out if isinstance(out, tuple) else (out,)
        sum((o * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).sum() for o in out).backward()
        return [o.detach() for o in out], [t.grad.clone() for t in leaves]

    out_t, grads_t = run("triton")
    out_r, grads_r = run("reference")
    for got, want in zip(out_t + grads_t, out_r + grads_r):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
