"""lora_kv_projection on CPU: the engine's op (auto → the torch backend) against the dense reference
and peft's LoRA layers carrying the same adapters, at SD-1.5 attn2 K/V shapes (Din 768, T 77).
Groups ``lora_kv-*`` time the forward (generation: ψ-weighted adapters per row), ``lora_kv-train-*``
forward + backward of one trained adapter (the training step's text side)."""

import pytest
import torch
from conftest import CTX, common, lora_kv, prepared

from lifelong_engine import ops

CASES = {  # (Dout, B, adapters per sample)
    "D320-B2-S1": (320, 2, 1),
    "D320-B2-S4": (320, 2, 4),
    "D1280-B2-S4": (1280, 2, 4),
}
PROVIDERS = {p.name: p for p in lora_kv.LORA_PROVIDERS}


def _case(name: str):
    dout, bsz, per_sample = CASES[name]
    torch.manual_seed(0)
    case = lora_kv.lora_case("sd15", 768, dout, bsz, per_sample)
    inputs = case.make(torch.device("cpu"), torch.float32)
    return case, inputs


@pytest.mark.parametrize("provider", ("ours_cpu", "reference", "peft"))
@pytest.mark.parametrize("name", list(CASES))
def test_lora_kv_forward(benchmark, name, provider):
    case, inputs = _case(name)
    call = prepared(PROVIDERS[provider], inputs, case.reference(inputs))
    benchmark.group = f"lora_kv-{name}"
    benchmark.extra_info.update(case.shape)
    benchmark(call)


def _train_call(provider: str, inputs: dict):
    """forward + backward with adapter 0 trained (lora_A, lora_B require grad), every row using it."""
    c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale = lora_kv._lora_args(inputs)
    ids = torch.zeros_like(ids[:, :1])
    weights = torch.ones(ids.shape)
    a_k, b_k, a_v, b_v = (t[:1].detach().clone().requires_grad_() for t in (a_k, b_k, a_v, b_v))
    leaves = (a_k, b_k, a_v, b_v)
    g = torch.randn(c.shape[0], c.shape[1], w_k.shape[0], generator=torch.Generator().manual_seed(1))
    if provider == "ours_cpu":

        def fwd():
            return ops.lora_kv_projection(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale)

        params = leaves
    elif provider == "peft":
        layer = {"w_k": w_k, "w_v": w_v, "a_k": a_k.detach(), "b_k": b_k.detach(), "a_v": a_v.detach()}
        module = lora_kv._peft_module({**layer, "b_v": b_v.detach()}, CTX.device, CTX.dtype)
        module.requires_grad_(False)
        params = []
        for proj in (module.to_k, module.to_v):
            proj.set_adapter("c0")
            params += [proj.lora_A["c0"].weight.requires_grad_(), proj.lora_B["c0"].weight.requires_grad_()]

        def fwd():
            return module.to_k(c), module.to_v(c)
    else:
        raise AssertionError(provider)

    def call():
        for p in params:
            p.grad = None
        k, v = fwd()
        torch.autograd.backward((k, v), (g, g))
        return [p.grad.flatten() for p in params]

    return call


@pytest.mark.parametrize("provider", ("ours_cpu", "peft"))
@pytest.mark.parametrize("name", ["D320-B2-S1", "D1280-B2-S4"])
def test_lora_kv_forward_backward(benchmark, name, provider):
    _, inputs = _case(name)
    want = [t.clone() for t in _train_call("ours_cpu", inputs)()]
    got = _train_call(provider, inputs)()
    err = common.max_err(common.tensors(got), want)
    assert err <= 1e-3 * max(float(w.abs().max()) for w in want), f"{provider}: gradient error {err:.3g}"
    benchmark.group = f"lora_kv-train-{name}"
    benchmark.extra_info.update(CASES=name, trained_adapters=1)
    benchmark(_train_call(provider, inputs))
