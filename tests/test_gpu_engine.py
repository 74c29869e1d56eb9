"""The engine end to end on a CUDA device, Triton kernels against the reference ops (marked gpu).

Tiny random SD pipelines on the GPU: generation with concepts and regions, attention guidance (its
backward runs through the kernels), the trainer under bf16 autocast and the serving engine. Half
precision follows FlashAttention's rule: the Triton run's error against the fp32 reference is at
most twice the reference's own error in the same dtype, plus a small floor.
"""

import numpy as np
import pytest
import torch
from concept_factory import concept_for_unet
from tiny_pipes import tiny_sd_pipeline

from lifelong_engine import AttentionGuidance, ConceptStore, LifelongPipeline, ops
from lifelong_engine.serving import Engine, GenerationRequest
from lifelong_engine.tinyworld import get_concept
from lifelong_engine.training import ContinualTrainer

pytestmark = pytest.mark.gpu

PROMPT = "a <dog1> dog and a <mug2> mug"
REGIONS = [("a <dog1> dog", (0.0, 0.0, 0.5, 1.0)), ("a <mug2> mug", (0.5, 0.0, 1.0, 1.0))]


DEVICE = "cuda"


def pipeline(dtype):
    pipe = tiny_sd_pipeline().to(DEVICE, dtype)
    pipe.set_progress_bar_config(disable=True)
    lp = LifelongPipeline.from_pipe(pipe)
    width = lp.text.token_width
    lp.add_concept(concept_for_unet(lp.unet, "dog1", width, seed=1, method="cidm"))
    lp.add_concept(concept_for_unet(lp.unet, "mug2", width, seed=2, method="cidm"))
    return lp


def generate(lp, backend, **kwargs):
    with ops.use_backend(backend):
        out = lp(PROMPT, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0), **kwargs)
    return out.images.astype(np.float64)


@pytest.fixture(autouse=True)
def _no_tf32():
    # cuDNN's convolutions too: they take TF32 by default, which turns the ~1e-6 difference of the
    # kernels' fp32 attention (tf32x3) into ~1e-3 after a few UNet steps (measured on an H200).
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.parametrize("kwargs", [{}, {"regions": REGIONS, "alpha": 0.5}], ids=["global", "regions"])
def test_generation_half_precision_within_twice_the_reference_error(kwargs):
    exact = generate(pipeline(torch.float32), "reference", **kwargs)
    for dtype in (torch.float16, torch.bfloat16):
        lp = pipeline(dtype)
        ref_err = np.abs(generate(lp, "reference", **kwargs) - exact).max()
        err = np.abs(generate(lp, "triton", **kwargs) - exact).max()
        assert err <= 2 * ref_err + 2e-3, (dtype, err, ref_err)


def test_generation_fp32_kernels_match_the_reference():
    lp = pipeline(torch.float32)
    kwargs = {"regions": REGIONS, "alpha": 0.5}
    np.testing.assert_allclose(generate(lp, "triton", **kwargs), generate(lp, "reference", **kwargs), atol=1e-4)


def test_attention_guidance_backward_through_the_kernels():
    lp = pipeline(torch.float32)
    options = AttentionGuidance(artist=1.0, orthogonal=1.0, steps=2, step_size=5.0)
    got = generate(lp, "triton", attention_guidance=options)
    np.testing.assert_allclose(got, generate(lp, "reference", attention_guidance=options), atol=1e-3)


def test_trainer_learns_under_bf16_autocast(tmp_path):
    pipe = tiny_sd_pipeline().to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    lp = LifelongPipeline.from_pipe(pipe)
    before = {k: v.clone() for k, v in lp.unet.state_dict().items()}
    trainer = ContinualTrainer(lp, method="cidm", max_steps=8, learning_rate=2e-2, seed=0, progress=False,
                               run_dir=tmp_path, mixed_precision="bf16", sample_steps=4)  # fmt: skip
    concept = get_concept("tw-badge")
    adapter = trainer.learn(concept.name, [s.image for s in concept.images(4, size=16)], "circle")
    stats = trainer.stats[concept.name]
    assert adapter.is_finite() and stats.eval_loss_after < stats.eval_loss_before
    assert stats.peak_memory_bytes > 0
    assert all(torch.equal(before[k], v) for k, v in lp.unet.state_dict().items())


def test_serving_batched_equals_alone(tmp_path):
    lp = pipeline(torch.float16)
    with ConceptStore(tmp_path / "store") as store:
        for name in ("dog1", "mug2"):
            store.save(lp.concepts[name])
        target = GenerationRequest(PROMPT, concepts=["dog1", "mug2"], seed=3, num_inference_steps=5,
                                   regions=REGIONS, alpha=0.5)  # fmt: skip
        with Engine(lp, store) as engine:
            alone = np.asarray(engine.generate([target])[0].images[0], dtype=np.int16)
        others = [GenerationRequest("a <mug2> mug", concepts=["mug2"], seed=s, num_inference_steps=7) for s in (4, 5)]
        with Engine(lp, store) as engine:
            futures = [engine.submit(r) for r in others]
            batched = np.asarray(engine.submit(target).result().images[0], dtype=np.int16)
            assert all(f.result().images for f in futures)
    assert np.abs(batched - alone).max() <= 2


def test_compose_concepts_on_the_device():
    """The merge's float64 solves on the GPU: exact constraints in fp32; usable factors in fp16."""
    from lifelong_engine.training import compose_concepts, merge

    captions = ["a red circle", "a cat on grass", "two blue squares"]
    lp = pipeline(torch.float32)
    composed = compose_concepts(lp, ["dog1", "mug2"], captions)
    layer = lp.layers[0]
    with torch.no_grad():
        rows = merge._rows(lp, ["<dog1>", "photo of a <dog1>"], from_concept=True)[0]
        w0 = lp.unet.get_submodule(layer).to_k.weight.double()
        target = rows @ (w0 + merge._delta64(lp.concepts["dog1"], layer, "to_k")).T
        got = rows @ (w0 + sum(merge._delta64(c, layer, "to_k") for c in composed)).T
    assert (got - target).abs().max() <= 1e-3 * target.abs().max()

    lp = pipeline(torch.float16)
    for concept in compose_concepts(lp, ["dog1", "mug2"], captions):
        assert concept.is_finite()
        lp.add_concept(concept, replace=True)
    assert np.isfinite(generate(lp, "triton")).all()
