"""The conditioning path's text K/V (issue 15): all attn2 layers in one grouped op call on the base K/V
weights packed once at install(), equal to the per-layer public op; no host sync; the pack follows the
model's weights (views, no copy; re-packed when a weight is replaced)."""

import pytest
import torch
from concept_factory import concept_for_unet
from sync_counter import SyncCounter
from tiny_pipes import tiny_sd_pipeline, tiny_sdxl_pipeline

from lifelong_engine import LifelongPipeline, ops


def _lp(sdxl=False):
    lp = LifelongPipeline.from_pipe(tiny_sdxl_pipeline() if sdxl else tiny_sd_pipeline())
    width = lp.text.token_width
    lp.add_concept(concept_for_unet(lp.unet, "dog1", width, seed=1, method="cidm"))
    lp.add_concept(concept_for_unet(lp.unet, "mug2", width, seed=2, method="cidm", rank=3))
    return lp


def _inputs(lp, seed=0):
    """Texts (3, L, T, D) and ids / weights (3, L, S) with a different ψ in every layer and an empty slot."""
    g = torch.Generator().manual_seed(seed)
    enc = lp.encode_prompt(["a <dog1> dog", "a <mug2> mug on a table", ""])
    L = len(lp.layers)
    ids = torch.tensor([0, 1]).repeat(3, L, 1)
    ids[2, :, 1] = -1
    weights = torch.rand(3, L, 2, generator=g)
    return enc.per_layer, ids, weights


def _per_layer(lp, per_layer, ids, weights):
    """The path before issue 15: the public per-layer op, once per layer, on the layers' own weights."""
    out = {}
    pool = lp.pool()
    for l, layer in enumerate(lp.layers):
        attn = lp.attention[layer]
        c = per_layer[:, l].to(lp.dtype)
        k, v = ops.lora_kv_projection(
            c, attn.to_k.weight, attn.to_v.weight, *pool.get(layer, "to_k"), *pool.get(layer, "to_v"),
            ids[:, l], weights[:, l], 1.0,
        )  # fmt: skip
        n, t_len, dout = k.shape
        out[layer] = tuple(x.view(n, t_len, attn.heads, -1).transpose(1, 2)[:, None] for x in (k, v))
    return out


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_grouped_text_kv_equals_the_per_layer_op(sdxl):
    lp = _lp(sdxl)
    per_layer, ids, weights = _inputs(lp)
    got = lp.text_kv(per_layer, lp.pool(), ids, weights)
    want = _per_layer(lp, per_layer, ids, weights)
    assert got.keys() == want.keys()
    for layer in want:
        for g, w in zip(got[layer], want[layer]):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_one_grouped_call_for_all_layers_and_no_host_sync(monkeypatch):
    """The per-layer public op made one value check (a host sync) per layer; the conditioning path now makes
    one trusted grouped call and no sync (reference backend: the device-agnostic path)."""
    lp = _lp()
    per_layer, ids, weights = _inputs(lp)
    calls = []
    real = ops.lora_kv_projection_grouped_trusted
    monkeypatch.setattr(ops, "lora_kv_projection_grouped_trusted", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad(), ops.use_backend("reference"), SyncCounter() as counter:  # as generation calls it
        lp.text_kv(per_layer, lp.pool(), ids, weights)
    assert len(calls) == 1
    assert counter.calls == []


@torch.no_grad()  # as generation runs (with base weights that require grad, text_kv takes the layers' own)
def test_the_pack_is_the_layers_weights_and_follows_them():
    lp = _lp()
    base = lp.base_kv
    attn = lp.attention[lp.layers[1]]
    # No copy: each layer's weight is a view into the packed tensor.
    assert attn.to_k.weight.untyped_storage().data_ptr() == base.w_k.untyped_storage().data_ptr()
    per_layer, ids, weights = _inputs(lp)
    attn.to_v.weight.data += 0.5  # an in-place edit (how peft merges a LoRA) is an edit of the pack
    torch.testing.assert_close(
        lp.text_kv(per_layer, lp.pool(), ids, weights)[lp.layers[1]][1],
        _per_layer(lp, per_layer, ids, weights)[lp.layers[1]][1],
    )
    attn.to_k.weight = torch.nn.Parameter(attn.to_k.weight.detach() * 2)  # a replaced weight: packed again
    got = lp.text_kv(per_layer, lp.pool(), ids, weights)[lp.layers[1]][0]
    torch.testing.assert_close(got, _per_layer(lp, per_layer, ids, weights)[lp.layers[1]][0])
    assert attn.to_k.weight.untyped_storage().data_ptr() == base.w_k.untyped_storage().data_ptr()


def test_text_kv_gradients_equal_the_per_layer_op():
    """The trainer's text side (the base frozen, as the trainer does): gradients of the texts and of the
    pool's factors through the one packed grouped call."""
    lp = _lp()
    lp.unet.requires_grad_(False)
    per_layer, ids, weights = _inputs(lp)
    pool = lp.pool()
    a, b = pool.get(lp.layers[2], "to_k")
    grads = []
    for fn in (lp.text_kv, lambda *args: _per_layer(lp, *args[:1], *args[2:])):
        c = per_layer.detach().clone().requires_grad_()
        a.requires_grad_(), b.requires_grad_()
        kv = fn(c, pool, ids, weights)
        sum((k.square().sum() + v.sum()) for k, v in kv.values()).backward()
        grads.append([c.grad, a.grad, b.grad])
        a.grad = b.grad = None
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_text_for_every_layer_is_run_once_and_equals_the_per_layer_texts():
    """Prompts without layer-wise token rows: the encoder's text is shared by every layer (per_layer its
    expanded view, no copy); text_kv of the shared (n, T, D) text equals text_kv of the materialised
    (n, L, T, D) texts, gradients included (a training step: one adapter shared by every row and layer)."""
    lp = LifelongPipeline.from_pipe(tiny_sd_pipeline())
    lp.add_concept(concept_for_unet(lp.unet, "dog1", lp.text.token_width, seed=1, method="lora-m", layerwise=False))
    lp.unet.requires_grad_(False)
    enc = lp.encode_prompt(["a <dog1> dog", "a <dog1> dog on a table"])
    assert enc.shared is not None and enc.text is enc.shared
    assert enc.per_layer.stride(1) == 0 and enc.per_layer.data_ptr() == enc.shared.data_ptr()
    n, L = enc.per_layer.shape[:2]
    ids, weights = torch.zeros(n, L, 1, dtype=torch.long), torch.ones(n, L, 1)
    pool = lp.pool()
    a, b = pool.get(lp.layers[1], "to_v")
    results = []
    for shared in (True, False):
        text = enc.shared.detach().clone().requires_grad_()
        a.requires_grad_(), b.requires_grad_()
        kv = lp.text_kv(text if shared else text[:, None].expand(-1, L, -1, -1).contiguous(), pool, ids, weights)
        sum((k.square().sum() + v.sum()) for k, v in kv.values()).backward()
        results.append([*(t for kv_l in kv.values() for t in kv_l), text.grad, a.grad, b.grad])
        a.grad = b.grad = None
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    layerwise = _lp().encode_prompt(["a <dog1> dog"])  # layer-wise token rows: a text per layer
    assert layerwise.shared is None and layerwise.text is layerwise.per_layer
