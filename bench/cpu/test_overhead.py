"""Per-call overhead of the public ops on CPU: each op on tiny inputs through ``lifelong_engine.ops``
(checks + torch.library dispatch + backend selection) against its torch-backend implementation
called directly; the difference is the overhead a hot loop pays per call. ``trusted``: the entry the
attention processors call in generation (``ops.<op>_trusted``: no value checks, no torch.library
dispatch without autograd), where it exists. Group ``overhead-<op>``."""

import inputs as op_inputs
import pytest
import torch
import torch.nn.functional as F

from lifelong_engine import ops, reference, torch_backend


def _pick(lora_kv_args):
    """lora_term's (x, a, b, ids, weights, scale) from lora_kv_projection's arguments."""
    return tuple(lora_kv_args[i] for i in (0, 3, 4, 7, 8, 9))


CASES = {
    "regional_cross_attention": lambda: op_inputs.regional(
        B=1, H=1, N=4, d=8, P=1, T=4, dtype=torch.float32, ragged=False
    )[:5],
    "lora_kv_projection": lambda: op_inputs.lora_kv(B=1, T=4, Din=8, Dout=8, N=1, S=1, dtype=torch.float32),
    "lora_term": lambda: _pick(op_inputs.lora_kv(B=1, T=4, Din=8, Dout=8, N=1, S=1, dtype=torch.float32)),
    "ewa_weights": lambda: op_inputs.ewa(B=1, L=2, T=4, D=8, G=2, dtype=torch.float32),
    "ewa_merge": lambda: op_inputs.merge(B=1, G=2, r=2, Din=8, Dout=8, dtype=torch.float32),
}
IMPL = {
    "regional_cross_attention": torch_backend.regional_cross_attention,
    "lora_kv_projection": torch_backend.lora_kv_projection,
    "lora_term": getattr(reference, "lora_term", None),  # the torch backend's lora_term is the reference's
    "ewa_weights": reference.ewa_weights,  # the torch backend's EWA ops are the reference's
    "ewa_merge": reference.ewa_merge,
}


@pytest.mark.parametrize("provider", ("op", "trusted", "impl", "sdpa"))
@pytest.mark.parametrize("op", list(CASES))
def test_call_overhead(benchmark, op, provider):
    torch.manual_seed(0)
    if not hasattr(ops, op):
        pytest.skip(f"ops.{op} does not exist on this branch")
    args = CASES[op]()
    if provider == "op":
        fn = getattr(ops, op)
    elif provider == "trusted":
        fn = getattr(ops, f"{op}_trusted", None)
        if fn is None:
            pytest.skip(f"no ops.{op}_trusted on this branch")
    elif provider == "impl":
        fn = IMPL[op]
    elif op == "regional_cross_attention":  # the peer: one SDPA call on the same tiny inputs
        q, k, v = args[:3]

        def fn(*_):
            return F.scaled_dot_product_attention(q, k[:, 0], v[:, 0])
    else:
        pytest.skip("sdpa: only for regional_cross_attention")
    torch.testing.assert_close(fn(*args), getattr(reference, op)(*args), atol=1e-5, rtol=1e-5)
    benchmark.group = f"overhead-{op}"
    benchmark(fn, *args)


def _train_case(layers: int = 2):
    """The trainer's text side on tiny inputs: one trained adapter shared by the batch (a training step),
    base K/V of ``layers`` attn2 layers packed, forward + backward to the adapter's factors."""
    torch.manual_seed(0)
    c = torch.randn(layers, 1, 4, 8)  # each layer its own text (layer-wise tokens)
    w_k, w_v = torch.randn(8 * layers, 8) / 8, torch.randn(8 * layers, 8) / 8
    factors = [[torch.randn(1, *shape, requires_grad=True) for _ in range(layers)] for shape in ((2, 8), (8, 2))] * 2
    return c, w_k, w_v, (8,) * layers, *factors, torch.zeros(layers, 1, 1, dtype=torch.long), torch.ones(layers, 1, 1)


def _plain_text_side(c, w_k, w_v, douts, a_k, b_k, a_v, b_v, ids, weights, scale=1.0):
    """The same K/V written as plain PyTorch autograd, layer by layer (what a peft LoRA layer computes)."""
    out, start = ([], []), 0
    for layer, dout in enumerate(douts):
        for o, w, a, b in zip(out, (w_k, w_v), (a_k, a_v), (b_k, b_v)):
            x = c[layer]
            o.append(x @ w[start : start + dout].T + ((x @ a[layer][0].T) @ b[layer][0].T) * scale)
        start += dout
    return out


@pytest.mark.parametrize("provider", ("trusted", "impl"))
def test_training_text_side_overhead(benchmark, provider):
    """Group ``overhead-train-text-side``: the trainer's one grouped call per step (issue 15) through the
    trusted entry (on CPU the torch backend's per-layer PyTorch ops under autograd, no custom backward),
    against the same math in plain autograd; forward + backward of two layers on tiny inputs, so the
    difference is what the entry adds to each training step."""
    args = _train_case()
    fn = ops.lora_kv_projection_grouped_trusted if provider == "trusted" else _plain_text_side
    for got, want in zip(fn(*args), _plain_text_side(*args)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    factors = [t for group in args[4:8] for t in group]

    def step():
        k, v = fn(*args)
        torch.autograd.backward([*k, *v], [torch.ones_like(t) for t in (*k, *v)])
        for t in factors:
            t.grad = None

    step()
    assert all(t.grad is None for t in factors)
    benchmark.group = "overhead-train-text-side"
    benchmark(step)
