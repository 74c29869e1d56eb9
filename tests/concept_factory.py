"""Small ConceptAdapters for tests."""

import torch

from lifelong_engine.concepts import ConceptAdapter

LAYERS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
    "mid_block.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2",
]
DOUTS = [6, 10, 6]
DIN = 8


def make_adapter(name="my-dog", rank=2, seed=0, q=False, **kwargs) -> ConceptAdapter:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for layer, dout in zip(LAYERS, DOUTS):
        for proj in ("to_k", "to_v") + (("to_q",) if q else ()):
            lora[f"{layer}.{proj}.lora_A.weight"] = torch.randn(rank, DIN, generator=g)
            lora[f"{layer}.{proj}.lora_B.weight"] = torch.randn(dout, rank, generator=g)
    fields = dict(
        name=name,
        token=f"<{name}>",
        words=[f"<{name}>", f"<{name}>_1"],
        class_word="dog",
        layers=LAYERS,
        lora=lora,
        rank=rank,
        alpha=float(rank) / 2,
        token_embeddings=torch.randn(len(LAYERS), 2, DIN, generator=g),
        concept_embeddings=torch.randn(len(LAYERS), DIN, generator=g),
        base_fingerprint="tiny-base",
        method="cidm",
        metadata={"steps": "100"},
    )
    fields.update(kwargs)
    return ConceptAdapter(**fields)


def assert_same(a: ConceptAdapter, b: ConceptAdapter) -> None:
    for field in ("name", "token", "words", "class_word", "layers", "rank", "alpha", "base_fingerprint", "method"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.metadata == b.metadata
    assert a.lora.keys() == b.lora.keys()
    for k in a.lora:
        assert torch.equal(a.lora[k], b.lora[k]), k
    assert torch.equal(a.token_embeddings, b.token_embeddings)
    assert torch.equal(a.concept_embeddings, b.concept_embeddings)


def concept_for_unet(
    unet,
    name="my-dog",
    token_width=None,
    rank=2,
    seed=0,
    projections=("to_k", "to_v"),
    layerwise=True,
    words=2,
    lora_std=0.3,
    **kwargs,
) -> ConceptAdapter:
    """A random concept that fits ``unet``: LoRA on every attn2 layer; token rows of ``token_width``
    per layer (``layerwise``) or shared (one row set), or none when token_width is None."""
    from lifelong_engine.formats import attn2_layers

    g = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    layers = attn2_layers(unet)
    lora = {}
    for layer in layers:
        for proj in projections:
            lin = modules[f"{layer}.{proj}"]
            lora[f"{layer}.{proj}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g) * lora_std
            lora[f"{layer}.{proj}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g) * lora_std
    tokens = None
    if token_width is not None:
        tokens = torch.randn(len(layers) if layerwise else 1, words, token_width, generator=g)
    fields = dict(
        name=name,
        token=f"<{name}>",
        words=[f"<{name}>"] + [f"<{name}>_{i}" for i in range(1, words)],
        layers=layers,
        lora=lora,
        rank=rank,
        token_embeddings=tokens,
    )
    fields.update(kwargs)
    return ConceptAdapter(**fields)
