"""ContinualTrainer on a tiny random SD pipeline with TinyWorld concept images (16x16)."""

import hashlib

import numpy as np
import PIL.Image
import pytest
import torch
from tiny_pipes import tiny_sd_pipeline, tiny_sdxl_pipeline

from lifelong_engine import ConceptStore, LifelongPipeline
from lifelong_engine.tinyworld import get_concept
from lifelong_engine.training import METHODS, ContinualTrainer, TrainingError, methods

CONCEPTS = ("tw-badge", "tw-flag")


def images(name, n=4):
    return [s.image for s in get_concept(name).images(n=n, size=16)]


def new_pipeline():
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return LifelongPipeline.from_pipe(pipe)


def trainer(lp, tmp_path, method="cidm", options=None, **kwargs):
    kwargs = {"max_steps": 6, "learning_rate": 2e-2, "seed": 0, "progress": False, "run_dir": tmp_path, **kwargs}
    kwargs.setdefault("sample_steps", 4)
    return ContinualTrainer(lp, method=methods.config(method, **(options or {})), **kwargs)


def fingerprint(*modules) -> str:
    h = hashlib.sha256()
    for m in modules:
        for name, t in sorted(m.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns_two_tasks_and_keeps_frozen_weights(method, tmp_path):
    lp = new_pipeline()
    frozen = fingerprint(lp.unet, lp.pipe.text_encoder, lp.pipe.vae)
    tr = trainer(lp, tmp_path, method)
    first = tr.learn(CONCEPTS[0], images(CONCEPTS[0]), get_concept(CONCEPTS[0]).class_word)
    first_tokens = first.token_embeddings.clone()
    first_lora = {k: v.clone() for k, v in first.lora.items()}
    tr.learn(CONCEPTS[1], images(CONCEPTS[1]), get_concept(CONCEPTS[1]).class_word)

    for name in CONCEPTS:
        stats = tr.stats[name]
        assert stats.eval_loss_after < stats.eval_loss_before, (method, name, stats)
        assert stats.steps == 6 and stats.skipped_steps == 0 and stats.steps_per_second > 0
    assert fingerprint(lp.unet, lp.pipe.text_encoder, lp.pipe.vae) == frozen  # base model bit-for-bit
    assert all(p.grad is None for p in lp.unet.parameters())  # and no gradient was ever computed for it
    assert torch.equal(first.token_embeddings, first_tokens)  # the returned past concept is untouched
    assert all(torch.equal(first.lora[k], v) for k, v in first_lora.items())
    assert torch.equal(lp.concepts[CONCEPTS[0]].token_embeddings, first_tokens)  # and so is its copy in use
    expected_rows = len(lp.layers) if method in ("cidm", "cidm-official") else 1
    assert first.token_embeddings.shape[0] == expected_rows and first.method == method
    out = lp("a photo of a <tw-badge> circle next to a <tw-flag> square", num_inference_steps=2, output_type="np")
    assert np.isfinite(out.images).all()


def test_cidm_keeps_task_subspaces_apart_compared_with_finetune(tmp_path):
    def overlap(method):
        lp = new_pipeline()
        tr = trainer(lp, tmp_path / method, method, {"gamma1": 10.0} if method == "cidm" else None)
        a1 = tr.learn(CONCEPTS[0], images(CONCEPTS[0]), "circle")
        a2 = tr.learn(CONCEPTS[1], images(CONCEPTS[1]), "square")
        return sum(  # R1 of the paper: ‖A_1·A_2ᵀ‖² with A the up projection (lora_B)
            float((a1.factors(layer, p)[1] @ a2.factors(layer, p)[1].T).square().sum())
            for layer in lp.layers
            for p in ("to_k", "to_v")
        )

    assert overlap("cidm") < 0.5 * overlap("finetune")


def test_cidm_shared_subspace_state_is_updated(tmp_path):
    lp = new_pipeline()
    tr = trainer(lp, tmp_path, "cidm", {"r2_every": 4})
    tr.learn(CONCEPTS[0], images(CONCEPTS[0]), "circle")
    tr.learn(CONCEPTS[1], images(CONCEPTS[1]), "square")
    shared = tr.strategy.r2[lp.layers[0], "to_k"]
    dout, din = lp.widths[lp.layers[0], "to_k"][::-1]
    assert shared["w"].shape == (dout, din) and set(shared["h"]) == set(CONCEPTS)
    # a new trainer over the same directory picks the state up
    again = trainer(new_pipeline(), tmp_path, "cidm")
    torch.testing.assert_close(again.strategy.r2[lp.layers[0], "to_k"]["w"], shared["w"])


def test_resume_ends_at_the_uninterrupted_adapter(tmp_path, monkeypatch):
    kwargs = dict(max_steps=10, checkpoint_every=5, options={"r2_every": 3})
    whole = trainer(new_pipeline(), tmp_path / "whole", **kwargs).learn(CONCEPTS[0], images(CONCEPTS[0]), "circle")

    run_dir = tmp_path / "broken"
    broken = trainer(new_pipeline(), run_dir, **kwargs)
    real_step, calls = broken._step, []

    def crash_on_seventh(*args):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(broken, "_step", crash_on_seventh)
    with pytest.raises(KeyboardInterrupt):
        broken.learn(CONCEPTS[0], images(CONCEPTS[0]), "circle")
    assert (run_dir / f"cidm-{CONCEPTS[0]}.ckpt").exists()

    resumed = trainer(new_pipeline(), run_dir, **kwargs).learn(CONCEPTS[0], images(CONCEPTS[0]), "circle", resume=True)
    for k, v in whole.lora.items():
        torch.testing.assert_close(resumed.lora[k], v, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed.token_embeddings, whole.token_embeddings, rtol=0, atol=1e-6)
    assert not (run_dir / f"cidm-{CONCEPTS[0]}.ckpt").exists()  # removed once the concept is learned


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    lp = new_pipeline()
    tr = trainer(lp, tmp_path, "lora-m", max_steps=6, max_bad_steps=3)
    real, calls = tr._regulariser, []

    def nan_twice(*args):
        calls.append(1)
        out = real(*args)
        return out + float("nan") if len(calls) in (2, 3) else out

    monkeypatch.setattr(tr, "_regulariser", nan_twice)
    with pytest.warns(UserWarning, match="non-finite"):
        tr.learn(CONCEPTS[0], images(CONCEPTS[0]), "circle")
    stats = tr.stats[CONCEPTS[0]]
    assert stats.skipped_steps == 2 and stats.steps == 4 and all(np.isfinite(stats.losses))

    monkeypatch.setattr(tr, "_regulariser", lambda *args: torch.tensor(float("nan")))
    with pytest.raises(TrainingError, match="3 steps in a row"), pytest.warns(UserWarning):
        tr.learn(CONCEPTS[1], images(CONCEPTS[1]), "square")
    assert CONCEPTS[1] not in lp.concepts


def test_a_step_with_a_finite_loss_but_a_non_finite_gradient_is_skipped(tmp_path, monkeypatch):
    """sqrt at 0 has a finite value and an infinite slope: the loss stays finite, one gradient is NaN; the
    step is skipped and nothing non-finite reaches the learned factors."""
    tr = trainer(new_pipeline(), tmp_path, "lora-m", max_steps=6, max_bad_steps=3)
    real, calls = tr._regulariser, []

    def nan_gradient_once(task, state, batch, gen):
        calls.append(1)
        out = real(task, state, batch, gen)
        if len(calls) == 2:
            out = out + torch.sqrt((next(iter(state.params.values())) * 0).sum())
        return out

    monkeypatch.setattr(tr, "_regulariser", nan_gradient_once)
    with pytest.warns(UserWarning, match="non-finite"):
        adapter = tr.learn(CONCEPTS[0], images(CONCEPTS[0]), "circle")
    stats = tr.stats[CONCEPTS[0]]
    assert stats.skipped_steps == 1 and stats.steps == 5
    assert all(bool(torch.isfinite(v).all()) for v in adapter.lora.values())


def test_saves_to_the_store_and_checkpoints_in_its_staging(tmp_path, monkeypatch):
    lp = new_pipeline()
    with ConceptStore(tmp_path / "store") as store:
        tr = ContinualTrainer(lp, "lora-m", max_steps=4, store=store, seed=0, progress=False, checkpoint_every=2)
        saved = []
        real = tr._save_checkpoint
        monkeypatch.setattr(tr, "_save_checkpoint", lambda path, *a: (saved.append(path), real(path, *a)))
        adapter = tr.learn(CONCEPTS[0], images(CONCEPTS[0]), "circle")
        assert saved and all(p.parent == store.staging for p in saved)
        loaded = store.load(CONCEPTS[0])
        assert torch.equal(loaded.token_embeddings, adapter.token_embeddings)
        assert loaded.metadata["steps"] == "4" and loaded.concept_embeddings.shape == (len(lp.layers), 32)


def test_images_from_a_folder_or_a_tensor(tmp_path):
    lp = new_pipeline()
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images(CONCEPTS[0])):
        im.save(folder / f"{i}.png")
    tr = trainer(lp, tmp_path / "run", "lora-m", max_steps=2)
    assert tr._load_images(folder).shape == (4, 3, 16, 16)
    tensor = torch.rand(3, 3, 20, 24)
    assert tr._load_images(tensor).shape == (3, 3, 16, 16)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "no images"),
        ([PIL.Image.new("RGB", (8, 8))], "smaller than the model's resolution"),
        ([PIL.Image.new("CMYK", (16, 16))], "mode"),
        ("/nonexistent/folder", "not a directory"),
        (torch.rand(2, 3, 16, 16) * 3, r"\[0, 1\]"),
        (torch.rand(2, 16, 16), r"\(N, 3, H, W\)"),
    ],
)
def test_bad_images_are_clear_errors(tmp_path, bad, message):
    tr = trainer(new_pipeline(), tmp_path, "lora-m")
    with pytest.raises(ValueError, match=message):
        tr.learn("x1", bad, "circle")


def test_bad_arguments(tmp_path):
    lp = new_pipeline()
    with pytest.raises(ValueError, match="unknown method"):
        ContinualTrainer(lp, "dreambooth")
    with pytest.raises(ValueError, match="no option.*gamma1"):
        methods.config("lora-m", gamma1=1.0)
    tr = trainer(lp, tmp_path, "lora-m", max_steps=2)
    with pytest.raises(ValueError, match="token"):
        tr.learn("x1", images(CONCEPTS[0]), "circle", captions=["no token here"] * 4)
    with pytest.raises(ValueError, match="class_word"):
        tr.learn("x1", images(CONCEPTS[0]), "")
    with pytest.raises(ValueError, match="mask"):
        tr.learn("x1", images(CONCEPTS[0]), "circle", masks=[torch.zeros(16, 16)] * 4)


def test_bf16_autocast_and_gradient_checkpointing(tmp_path):
    lp = new_pipeline()
    tr = trainer(lp, tmp_path, "cidm", max_steps=4, mixed_precision="bf16", gradient_checkpointing=True)
    adapter = tr.learn(CONCEPTS[0], images(CONCEPTS[0]), "circle")
    assert adapter.is_finite() and next(iter(adapter.lora.values())).dtype == torch.float32
    assert tr.stats[CONCEPTS[0]].skipped_steps == 0
    assert not lp.unet.is_gradient_checkpointing  # switched off again after learn
    with pytest.raises(ValueError, match="bf16"):
        trainer(lp, tmp_path, mixed_precision="fp16")


@pytest.mark.parametrize("method", ["cidm", "custom-diffusion"])
def test_learns_on_sdxl(method, tmp_path):
    """SDXL: two text encoders (token rows 32 + 32 wide), the pooled embedding and time ids in the UNet call."""
    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    lp = LifelongPipeline.from_pipe(pipe)
    frozen = fingerprint(lp.unet, pipe.text_encoder, pipe.text_encoder_2)
    tr = trainer(lp, tmp_path, method, {"class_images": 2} if method == "custom-diffusion" else None)
    adapter = tr.learn(CONCEPTS[0], images(CONCEPTS[0]), "circle")
    stats = tr.stats[CONCEPTS[0]]
    assert stats.eval_loss_after < stats.eval_loss_before and adapter.is_finite()
    assert adapter.token_embeddings.shape[-1] == 64  # rows for both encoders, concatenated
    assert fingerprint(lp.unet, pipe.text_encoder, pipe.text_encoder_2) == frozen
    out = lp("a photo of a <tw-badge> circle", num_inference_steps=2, output_type="np")
    assert np.isfinite(out.images).all()


def test_without_a_run_dir_each_trainer_has_its_own():
    """Method state (CIDM's W_*, EWC's Fisher, …) of one run must not leak into another's."""
    lp = new_pipeline()
    first, second = (ContinualTrainer(lp, progress=False) for _ in range(2))
    assert first.run_dir != second.run_dir and first.run_dir.is_dir()


@pytest.mark.parametrize("method", ["lora-m", "cidm"])
def test_a_step_encodes_each_distinct_caption_once_and_equals_one_sample_at_a_time(method, tmp_path, monkeypatch):
    """A batch whose captions repeat (a concept's default captions are all the same): the text side runs
    once per distinct caption, and each sample's prediction equals the prediction of it alone."""
    lp = new_pipeline()
    tr = trainer(lp, tmp_path, method)
    token = f"<{CONCEPTS[0]}>"
    captions = [f"a photo of a {token} circle", f"a {token} circle on grass"]
    pixels = tr._load_images(images(CONCEPTS[0], n=2))
    task = tr._encode_task(CONCEPTS[0], token, "circle", pixels, captions, None)
    gen = torch.Generator().manual_seed(0)
    state = tr._init_task(task, gen)
    for p in state.params.values():  # a trained-looking adapter: no factor left at zero
        p.data += 0.05 * torch.randn(p.shape, generator=gen)
    batch = [captions[0], captions[1], captions[0], captions[0]]
    noisy, t, _ = tr.noised(task.latents_mean[[0, 1, 0, 0]], gen)
    encoded, real = [], lp.text.encode
    monkeypatch.setattr(
        lp.text, "encode", lambda prompts, *a, **k: encoded.append(len(prompts)) or real(prompts, *a, **k)
    )
    with torch.no_grad():
        together = tr.predict(state, task, batch, noisy, t)
        assert encoded == [2]
        alone = torch.cat([tr.predict(state, task, [c], noisy[i : i + 1], t[i : i + 1]) for i, c in enumerate(batch)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
