"""compose_concepts: Custom Diffusion's closed-form merge of learned concepts, on a tiny SD pipeline."""

import dataclasses

import numpy as np
import pytest
import torch
from concept_factory import concept_for_unet
from tiny_pipes import tiny_sd_pipeline

from lifelong_engine import ConceptStore, LifelongPipeline
from lifelong_engine.training import compose_concepts, merge

CAPTIONS = ["a red circle", "a cat on grass", "two blue squares", "a photo of a house at night"]
NAMES = ["dog1", "mug2"]


@pytest.fixture
def lp():
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    lp = LifelongPipeline.from_pipe(pipe)
    width = lp.text.token_width
    lp.add_concept(concept_for_unet(lp.unet, "dog1", width, seed=1, class_word="dog", method="custom-diffusion"))
    lp.add_concept(concept_for_unet(lp.unet, "mug2", width, seed=2, layerwise=False, class_word="mug"))
    return lp


def weights(lp, adapters, layer, proj):
    """W0 + Σ deltas of ``adapters``, float64."""
    w = getattr(lp.attention[layer], proj).weight.detach().double()
    return w + sum(a.delta(layer, proj).double() for a in adapters)


@torch.no_grad()
def test_each_concept_keeps_its_own_mapping_and_generic_prompts_move_least(lp):
    before = [lp.concepts[n] for n in NAMES]
    composed = compose_concepts(lp, NAMES, CAPTIONS)
    assert [c.name for c in composed] == NAMES
    reg = merge._rows(lp, CAPTIONS, from_concept=False)
    rows = [
        merge._rows(lp, [f"{c.token} {c.class_word}", f"photo of a {c.token} {c.class_word}"], from_concept=True)
        for c in before
    ]
    for l, layer in enumerate(lp.layers):
        for proj in ("to_k", "to_v"):
            w0, w = weights(lp, [], layer, proj), weights(lp, composed, layer, proj)
            for concept, r in zip(before, rows):
                target = r[l] @ weights(lp, [concept], layer, proj).T  # the concept under its own W_i
                assert (r[l] @ w.T - target).abs().max() <= 1e-3 * target.abs().max(), (concept.name, layer, proj)
            # (factors are stored in fp32: 1e-3 of the scale; the plain sum of deltas misses by O(1))
            # another weight meeting the same constraints: the least-norm update, blind to the captions
            c = torch.cat([r[l] for r in rows])
            v = torch.cat([r[l] @ weights(lp, [k], layer, proj).T for k, r in zip(before, rows)]).T
            blind = w0 + torch.linalg.lstsq(c, (v - w0 @ c.T).T).solution.T
            torch.testing.assert_close(c @ blind.T, v.T)
            assert ((w - w0) @ reg[l].T).norm() < ((blind - w0) @ reg[l].T).norm()
            # each concept's part is a projection of the update: no part outgrows the sum (no cancellation)
            parts = [c.delta(layer, proj).double() for c in composed]
            assert all(p.norm() <= (w - w0).norm() * (1 + 1e-6) for p in parts)


def test_result_keeps_tokens_records_the_merge_and_generates(lp, tmp_path):
    composed = compose_concepts(lp, NAMES, CAPTIONS)
    for old, new in zip([lp.concepts[n] for n in NAMES], composed):
        assert new.token == old.token and new.words == old.words
        assert torch.equal(new.token_embeddings, old.token_embeddings)
        assert new.method == "custom-diffusion" and new.alpha == new.rank
        assert new.metadata["composed_with"] == ",".join(n for n in NAMES if n != old.name)
        assert new.metadata["composed_from_method"] == old.method
        assert new.lora.keys() == old.lora.keys()
        # rank: at most the concept's constraint rows ("<tok> class" and "photo of a <tok> class")
        assert 1 <= new.rank <= 2 * (len(new.words) + len(lp.pipe.tokenizer.tokenize(old.class_word)) + 1)
        a, _ = new.factors(lp.layers[0], "to_k")
        torch.testing.assert_close(a @ a.T, torch.eye(new.rank), atol=1e-5, rtol=0)  # orthonormal A: fp16-safe
    assert set(lp.concepts) == set(NAMES) and lp.concepts["dog1"].method == "custom-diffusion"  # unchanged
    assert lp.concepts["mug2"].method == ""

    store = ConceptStore(tmp_path / "store")
    for c in composed:
        lp.add_concept(c, replace=True)
        store.save(c)
    out = lp("a <dog1> dog and a <mug2> mug", num_inference_steps=2, output_type="np")
    assert np.isfinite(out.images).all()
    assert torch.equal(out.psi, torch.ones_like(out.psi))  # the composed library is summed
    loaded = store.load("dog1")
    assert loaded.metadata["composed_with"] == "mug2"


def test_one_concept_alone_and_repeated_rows(lp):
    (alone,) = compose_concepts(lp, ["dog1"], CAPTIONS)
    assert alone.is_finite()
    rows = merge._rows(lp, ["<dog1> dog"], from_concept=True)
    kept = merge._drop_repeated_rows([rows, rows[:, 1:].clone()])
    assert kept[0].shape == rows.shape and kept[1].shape[1] == 0
    # the same concept under two names: every row of the second repeats the first's
    lp.add_concept(dataclasses.replace(lp.concepts["dog1"], name="dog1-copy", token="<dog1-copy>"))
    with pytest.raises(ValueError, match="dog1-copy.*same as"):
        compose_concepts(lp, ["dog1", "dog1-copy"], CAPTIONS)


@pytest.mark.parametrize(
    "names, captions, error, message",
    [
        ([], CAPTIONS, ValueError, "names is empty"),
        (["dog1", "dog1"], CAPTIONS, ValueError, "repeats"),
        (["dog1", "cat9"], CAPTIONS, KeyError, "no concept"),
        (NAMES, [], ValueError, "regularization_prompts"),
        (NAMES, ["a cat", "  "], ValueError, "regularization_prompts"),
    ],
)
def test_bad_arguments(lp, names, captions, error, message):
    with pytest.raises(error, match=message):
        compose_concepts(lp, names, captions)


def test_concepts_adapting_image_side_projections_are_refused(lp):
    q = concept_for_unet(lp.unet, "sks", lp.text.token_width, projections=("to_k", "to_v", "to_q"))
    lp.add_concept(q)
    with pytest.raises(ValueError, match="to_k / to_v only"):
        compose_concepts(lp, ["dog1", "sks"], CAPTIONS)


def test_a_concept_without_token_rows_is_constrained_on_its_whole_prompt(lp):
    plain = concept_for_unet(lp.unet, "sks", None, seed=5, class_word="cat", token="sks")  # a trigger word
    lp.add_concept(plain)
    composed = compose_concepts(lp, ["sks"], CAPTIONS)  # (the tiny text width holds one such concept)
    prompts = ["sks cat", "photo of a sks cat"]
    rows = merge._rows(lp, prompts, from_concept=True)
    assert rows.shape[1] == int(lp.encode_prompt(prompts).ewa_mask.sum())  # every word and EOS
    layer = lp.layers[0]
    w = weights(lp, composed, layer, "to_k")
    target = rows[0] @ weights(lp, [plain], layer, "to_k").T
    assert (rows[0] @ w.T - target).abs().max() <= 1e-3 * target.abs().max()
