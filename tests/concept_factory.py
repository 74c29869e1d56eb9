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
