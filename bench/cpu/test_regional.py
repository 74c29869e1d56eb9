"""regional_cross_attention on CPU: the engine's op (auto → the torch backend) against plain SDPA,
one SDPA per region then select, SDPA with a dense additive mask, compiled FlexAttention and the
dense reference, at an SD-1.5 attn2 layer (B 2, H 8, N 1024, d 40, T 77) with P = 1 / 3 / 5 slots.
Groups ``regional-P*`` time the forward, ``regional-train-P*`` forward + backward."""

import pytest
import torch
import torch.nn.functional as F
from conftest import common, prepared, regional

from lifelong_engine import ops, reference, torch_backend

SLOTS = (1, 3, 5)
SHAPE = dict(model="sd15", n_q=1024, heads=8, d=40, bsz=2)


def _case(n_slots: int) -> tuple[dict, torch.Tensor]:
    torch.manual_seed(0)
    case = regional.regional_case(n_slots=n_slots, **SHAPE)
    inputs = case.make(torch.device("cpu"), torch.float32)
    return inputs, case.reference(inputs)


PROVIDERS = {p.name: p for p in regional.REGIONAL_PROVIDERS}
PROVIDERS["ours_impl"] = common.Provider(  # the implementation without the op's checks and dispatch
    "ours_impl",
    lambda i, ctx: common.Prepared(lambda: torch_backend.regional_cross_attention(*regional._regional_args(i))),
)
NAMES = ("ours_cpu", "ours_impl", "sdpa", "sdpa_per_region", "sdpa_mask", "flex", "reference")


@pytest.mark.parametrize("provider", NAMES)
@pytest.mark.parametrize("n_slots", SLOTS)
def test_regional_forward(benchmark, n_slots, provider):
    inputs, want = _case(n_slots)
    call = prepared(PROVIDERS[provider], inputs, want)
    benchmark.group = f"regional-P{n_slots}"
    benchmark.extra_info.update(SHAPE, P=n_slots, T=regional.TEXT_LEN, dtype="float32")
    benchmark(call)


def _train_call(provider: str, inputs: dict):
    """forward + backward of provider on leaves q, k, v (fresh grads each call)."""
    q, k, v, region_ids, kv_len, scale = regional._regional_args(inputs)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    n_slots = k.shape[1]
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    if provider == "ours_cpu":
        fwd = lambda: ops.regional_cross_attention(q, k, v, region_ids, kv_len, scale)  # noqa: E731
    elif provider == "reference":
        fwd = lambda: reference.regional_cross_attention(q, k, v, region_ids, kv_len, scale)  # noqa: E731
    elif provider == "sdpa":
        if n_slots != 1:
            pytest.skip("plain SDPA has no notion of regions: only P = 1")
        fwd = lambda: F.scaled_dot_product_attention(q, k[:, 0], v[:, 0], scale=scale)  # noqa: E731
    elif provider == "sdpa_per_region":
        if n_slots == 1:
            pytest.skip("the same as sdpa when P = 1")
        rows = [(region_ids == p)[:, None, :, None] for p in range(n_slots)]

        def fwd():
            out = F.scaled_dot_product_attention(q, k[:, 0], v[:, 0], scale=scale)
            for p in range(1, n_slots):
                out = torch.where(rows[p], F.scaled_dot_product_attention(q, k[:, p], v[:, p], scale=scale), out)
            return out
    elif provider == "sdpa_mask":
        allowed = regional._allowed_keys(region_ids, kv_len, n_slots, k.shape[3])[:, None]
        bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
        fwd = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q, regional._flat_kv(k), regional._flat_kv(v), attn_mask=bias, scale=scale
        )
    else:
        raise AssertionError(provider)

    def call():
        q.grad = k.grad = v.grad = None
        out = fwd()
        out.backward(grad)
        return q.grad, k.grad, v.grad

    return call


@pytest.mark.parametrize("provider", ("ours_cpu", "sdpa", "sdpa_per_region", "sdpa_mask", "reference"))
@pytest.mark.parametrize("n_slots", SLOTS)
def test_regional_forward_backward(benchmark, n_slots, provider):
    inputs, _ = _case(n_slots)
    want = _train_call("reference", inputs)()
    want = [g.clone() for g in want]
    call = _train_call(provider, inputs)
    err = common.max_err(common.tensors(call()), want)
    assert err <= 1e-4, f"{provider}: gradient error {err:.3g} against the reference"
    benchmark.group = f"regional-train-P{n_slots}"
    benchmark.extra_info.update(SHAPE, P=n_slots, T=regional.TEXT_LEN, dtype="float32")
    benchmark(call)
