"""CIDM as the paper writes it and as its released code does (issue 16): R1 on the up projections, the
released code's consolidation terms, its EWA over token rows, and the replay baseline.

Each formula is written here from the paper / the issue, independently of the engine's code."""

import json

import pytest
import torch
from kernel_testing import DEVICE, requires_triton
from tiny_pipes import tiny_sd_pipeline

from lifelong_engine import LifelongPipeline, ops
from lifelong_engine.concepts import ConceptAdapter
from lifelong_engine.tinyworld import get_concept
from lifelong_engine.training import ContinualTrainer, losses, methods
from lifelong_engine.training.methods.base import Batch, training_captions

# ---------------------------------------------------------------------------------------------- R1


def r1_formula(ups_prev, up_new):
    """Σ_i ‖A_i·A_gᵀ‖_F², A = the paper's A ∈ R^{a×r} = lora_B (Dout×r), each product a×a."""
    return sum(float((a @ up_new.T).detach().square().sum()) for a in ups_prev)


def test_r1_is_zero_for_orthogonal_ups_with_a_shared_down():
    torch.manual_seed(0)
    dout, din = 6, 5
    down = torch.randn(4, din, dtype=torch.float64)  # shared by both tasks
    up_old = torch.zeros(dout, 4, dtype=torch.float64)
    up_new = torch.zeros(dout, 4, dtype=torch.float64)
    up_old[:, :2] = torch.randn(dout, 2)  # rank components 0, 1
    up_new[:, 2:] = torch.randn(dout, 2)  # rank components 2, 3: A_old·A_newᵀ = 0
    assert r1_formula([up_old], up_new) == 0
    assert float(losses.orthogonal_subspace_loss([up_old], up_new)) == 0
    # the old (down-projection) form would not be zero here: the downs are the same matrix
    assert float((down @ down.T).square().sum()) > 0


def test_r1_is_positive_for_a_shared_up_and_matches_the_formula():
    torch.manual_seed(1)
    up = torch.randn(7, 3, dtype=torch.float64)
    got = float(losses.orthogonal_subspace_loss([up], up))
    assert got > 0 and got == pytest.approx(r1_formula([up], up), rel=1e-12)
    prev = [torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)]
    new = torch.randn(7, 3, dtype=torch.float64)
    padded = [torch.nn.functional.pad(prev[0], (0, 0)), torch.nn.functional.pad(prev[1], (0, 1))]  # ranks padded
    assert float(losses.orthogonal_subspace_loss(prev, new)) == pytest.approx(r1_formula(padded, new), rel=1e-12)


def test_official_terms_match_their_formulas():
    torch.manual_seed(2)
    prev = [torch.randn(6, 3, dtype=torch.float64) for _ in range(2)]
    new = torch.randn(6, 3, dtype=torch.float64)
    overlap = sum(float((new @ b.T).abs().mean()) for b in prev) / len(prev)  # mean_i mean|B_new·B_iᵀ|
    assert float(losses.up_overlap_loss(prev, new)) == pytest.approx(overlap, rel=1e-12)
    assert float(losses.enhancement_loss(new)) == pytest.approx(float(((new - 1) ** 2).mean()), rel=1e-12)
    # orthogonal downs with a shared up: zero for R1 on downs, not for the released code's term on ups
    assert float(losses.up_overlap_loss([new], new)) > 0


# ------------------------------------------------------------------------------- methods on a pipeline


def _pipeline():
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return LifelongPipeline.from_pipe(pipe)


def _images(name, n=3):
    return [s.image for s in get_concept(name).images(n=n, size=16)]


def _second_task_state(method, tmp_path, **options):
    """A trainer that learned tw-badge, and the TaskState of its next task with random lora_B."""
    lp = _pipeline()
    tr = ContinualTrainer(lp, methods.config(method, **options), max_steps=2, learning_rate=2e-2, seed=0,
                          progress=False, run_dir=tmp_path, sample_steps=2)  # fmt: skip
    first = tr.learn("tw-badge", _images("tw-badge"), "circle")
    task = tr._encode_task("tw-flag", "<tw-flag>", "square", tr._load_images(_images("tw-flag")),
                           ["a photo of a <tw-flag> square"] * 3, None)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    state = tr._init_task(task, gen)
    with torch.no_grad():
        for k, v in state.params.items():
            if k.endswith("lora_B.weight"):
                v.copy_(torch.randn(v.shape, generator=gen))
    batch = Batch([], None, None, None, torch.zeros(1))
    return tr, first, task, state, batch


def test_cidm_r1_gradient_reaches_lora_b_only(tmp_path):
    tr, first, task, state, batch = _second_task_state("cidm", tmp_path, gamma2=0.0)
    reg = tr.strategy.regulariser(task, state, batch, None)
    want = 0.1 * sum(
        r1_formula([first.factors(layer, p)[1].double()], state.params[f"{layer}.{p}.lora_B.weight"].double())
        for layer in tr.pipeline.layers
        for p in ("to_k", "to_v")
    )
    assert float(reg.detach()) == pytest.approx(want, rel=1e-5) and want > 0
    reg.backward()
    for k, v in state.params.items():
        if k.endswith("lora_B.weight"):
            assert v.grad is not None and v.grad.abs().sum() > 0, k
        else:
            assert v.grad is None or not v.grad.any(), k


def test_cidm_official_regulariser_is_the_released_codes(tmp_path):
    tr, first, task, state, batch = _second_task_state("cidm-official", tmp_path)
    keys = [(layer, p) for layer in tr.pipeline.layers for p in ("to_k", "to_v", "to_q", "to_out.0")]
    ups = {key: state.params[f"{key[0]}.{key[1]}.lora_B.weight"].double() for key in keys}
    orth = sum(float((ups[k] @ first.factors(*k)[1].double().T).abs().mean()) for k in keys) / len(keys)
    enh = sum(float(((ups[k] - 1) ** 2).mean()) for k in keys) / len(keys)
    got = tr.strategy.regulariser(task, state, batch, None)
    assert float(got) == pytest.approx(0.1 * orth + 0.1 * enh, rel=1e-5)
    # the released code's inference: strength 0.8, q/k/v/out LoRA, its EWA by default
    assert first.scale == pytest.approx(0.8) and first.metadata["ewa"] == "official"
    assert {"to_q", "to_out.0", "to_k", "to_v"} <= set(first.projections)
    assert tr.pipeline.library().default_ewa == "official"


def test_replay_rehearses_only_past_concepts(tmp_path, monkeypatch):
    lp = _pipeline()
    tr = ContinualTrainer(lp, methods.config("rpy", per_concept=2), max_steps=3, learning_rate=2e-2, seed=0,
                          progress=False, run_dir=tmp_path, sample_steps=2)  # fmt: skip
    drawn = []
    real = tr.strategy.replay_batch

    def record(n, gen):
        names, latents, captions = real(n, gen)
        drawn.append(set(names))
        assert all(f"<{c}>" in cap for c, cap in zip(names, captions))
        return names, latents, captions

    monkeypatch.setattr(tr.strategy, "replay_batch", record)
    names = ["tw-badge", "tw-flag", "tw-kite"]
    taught = {}
    for i, name in enumerate(names):
        drawn.clear()
        concept = get_concept(name)
        samples = concept.images(n=3, size=16)  # captioned in the world's grammar, not "a photo of"
        taught[name] = [s.caption for s in samples]
        adapter = tr.learn(name, [s.image for s in samples], concept.class_word, taught[name])
        assert json.loads(adapter.metadata["captions"]) == list(dict.fromkeys(taught[name]))
        seen = set().union(*drawn) if drawn else set()
        assert seen <= set(names[:i]), (name, seen)  # never the concept being learned
        assert (len(drawn) == 3) == (i > 0)  # every step of every later task rehearses
    assert set(tr.strategy.latents) == set(names[:2])  # images of the last one are made when a task needs them
    for name in names[:2]:  # a past concept is rehearsed with the captions it was taught with, in turn
        known = list(dict.fromkeys(taught[name]))
        assert tr.strategy.captions[name] == [known[i % len(known)] for i in range(2)]
        assert len(tr.strategy.latents[name]) == 2


def test_l2dm_remembers_a_past_concept_under_the_captions_it_was_taught(tmp_path):
    lp = _pipeline()
    tr = ContinualTrainer(lp, methods.config("l2dm", replay_per_concept=2), max_steps=2, learning_rate=2e-2,
                          seed=0, progress=False, run_dir=tmp_path, sample_steps=2)  # fmt: skip
    taught = {}
    for name in ("tw-badge", "tw-flag"):
        concept = get_concept(name)
        samples = concept.images(n=3, size=16)
        taught[name] = [s.caption for s in samples]
        tr.learn(name, [s.image for s in samples], concept.class_word, taught[name])
    kept = tr.strategy.memory.samples("tw-badge")
    assert len(kept) == 2 and {s.caption for s in kept} <= set(taught["tw-badge"])


def test_a_concept_without_recorded_captions_is_rehearsed_with_the_default_caption():
    adapter = ConceptAdapter(name="old", token="<old>", words=["<old>"], class_word="dog", layers=[], lora={}, rank=1)
    assert training_captions(adapter) == ["a photo of a <old> dog"]
    adapter.metadata["captions"] = json.dumps(["a <old> dog on grass", "a large <old> dog"])
    assert training_captions(adapter) == ["a <old> dog on grass", "a large <old> dog"]
    for bad in ("a <old> dog", json.dumps([]), json.dumps({"a": 1}), json.dumps(["ok", 3])):  # e.g. another tool's
        adapter.metadata["captions"] = bad
        with pytest.raises(ValueError, match="'old': metadata 'captions' must be a JSON list"):
            training_captions(adapter)


# ------------------------------------------------------------------------------------ official EWA


def naive_official_psi(prompt, rows, counts, power=4.0):
    """The released code's EWA, literally: for each task, for each of its token rows, the max over all
    prompt positions of the cosine; the mean over the task's rows; power 4; L1 over tasks."""
    B, L, T, _ = prompt.shape
    psi = torch.zeros(B, L, len(counts), dtype=torch.float64)
    for b in range(B):
        for layer in range(L):
            m = []
            for g, n in enumerate(counts):
                best = []
                for w in range(n):
                    e = rows[layer, g, w]
                    best.append(max(float(torch.dot(prompt[b, layer, t], e) / (prompt[b, layer, t].norm() * e.norm()))
                                    for t in range(T)))  # fmt: skip
                m.append(sum(best) / n)
            total = sum(abs(x**power) for x in m)
            for g in range(len(counts)):
                psi[b, layer, g] = m[g] ** power / total
    return psi


def _rows_inputs(dtype=torch.float64, device="cpu", B=2, L=3, T=9, D=6, counts=(2, 1, 2)):
    g = torch.Generator().manual_seed(3)
    prompt = torch.randn(B, L, T, D, generator=g, dtype=torch.float64)
    rows = torch.randn(L, len(counts), max(counts), D, generator=g, dtype=torch.float64)
    present = torch.zeros(len(counts), max(counts), dtype=torch.bool)
    for i, n in enumerate(counts):
        present[i, :n] = True
        rows[:, i, n:] = 100.0  # padding rows must not count
    return prompt.to(device, dtype), rows.to(device, dtype), present.to(device)


def test_official_ewa_op_follows_the_released_code():
    prompt, rows, present = _rows_inputs()
    want = naive_official_psi(prompt, rows, [2, 1, 2])
    with ops.use_backend("reference"):
        got = ops.ewa_weights_rows(prompt, rows, present)
    torch.testing.assert_close(got, want)
    # it is not the paper's EWA against the rows' mean (b), nor masked (c)
    paper = ops.ewa_weights(prompt, (rows * present[None, :, :, None]).sum(2) / present.sum(1)[None, :, None],
                            power=4.0, norm="l1")  # fmt: skip
    assert (paper - got).abs().max() > 1e-3


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [dict(B=1, L=1, T=1, D=1, counts=(1,)), dict(B=2, L=3, T=77, D=13, counts=(2, 1, 2)),
                                   dict(B=2, L=2, T=40, D=70, counts=(2,) * 19 + (1,) * 18)])  # fmt: skip
def test_official_ewa_triton_kernel(shape, dtype):
    prompt, rows, present = _rows_inputs(dtype, DEVICE, **shape)
    mask = torch.ones(prompt.shape[0], prompt.shape[2], dtype=torch.bool, device=DEVICE)
    mask[0, -1:] = prompt.shape[2] == 1  # one sample without its last token (unless T = 1)
    for m in (None, mask):
        with ops.use_backend("triton"):
            got = ops.ewa_weights_rows(prompt, rows, present, m)
        want = ops.ewa_weights_rows(prompt.double().cpu(), rows.double().cpu(), present.cpu(),
                                    None if m is None else m.cpu())  # fmt: skip
        assert got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 3e-3
        torch.testing.assert_close(got.cpu().double(), want, atol=tol, rtol=tol)


def test_official_ewa_op_checks_opcheck_and_gradients():
    prompt, rows, present = _rows_inputs()
    with pytest.raises(ValueError, match="concept_rows rows \\[1\\] select no token row"):
        ops.ewa_weights_rows(prompt, rows, present & torch.tensor([[True], [False], [True]]))
    with pytest.raises(ValueError, match="concepts must be 4-D"):
        ops.ewa_weights_rows(prompt, rows[:, :, 0], present)
    with pytest.raises(ValueError, match="norm='l3'"):
        ops.ewa_weights_rows(prompt, rows, present, norm="l3")
    p, c = prompt.clone().requires_grad_(), rows.clone().requires_grad_()
    with ops.use_backend("reference"):
        torch.library.opcheck(torch.ops.lifelong.ewa_weights_rows, (p, c, present, None, 4.0, "l1"))
        assert torch.autograd.gradcheck(lambda a, b: ops.ewa_weights_rows(a, b, present), (p, c))


def test_pipeline_official_ewa_encodes_all_concepts_in_one_prompt(tmp_path):
    """(a): the rows are the outputs of ONE prompt "<c1> <c2>" at each concept's word positions (BOS at 0),
    so the second concept's rows are encoded after the first's; then (b), (c) as the naive loop."""
    lp = _pipeline()
    tr = ContinualTrainer(lp, "cidm-official", max_steps=1, seed=0, progress=False, run_dir=tmp_path)
    for name in ("tw-badge", "tw-flag"):
        tr.learn(name, _images(name), get_concept(name).class_word)
    concepts = {c.token: c for c in lp.concepts.values()}
    together = lp.text.encode(["<tw-badge> <tw-flag>"], concepts).per_layer[0]  # (L, T, D)
    rows = torch.stack([together[:, 1:3], together[:, 3:5]], 1).double()  # (L, G=2, W=2, D)
    alone = lp.text.encode(["<tw-flag>"], concepts).per_layer[0][:, 1:3].double()
    assert (alone - rows[:, 1]).abs().max() > 1e-4  # context matters: CLIP is causal
    prompt = "a photo of a <tw-flag> square"
    encoded = lp.text.encode([prompt], concepts).per_layer.double()
    want = naive_official_psi(encoded, rows, [2, 2])
    _, psi = lp.concept_weights(lp.text.encode([prompt], concepts), variant="official")
    torch.testing.assert_close(psi.double(), want, atol=1e-5, rtol=1e-5)
    # selectable at inference independently of the training profile
    out = lp(prompt, num_inference_steps=1, output_type="latent")
    torch.testing.assert_close(out.psi[0].double(), want[0], atol=1e-5, rtol=1e-5)
    paper = lp(prompt, num_inference_steps=1, output_type="latent", ewa="paper").psi
    _, want_paper = lp.concept_weights(lp.text.encode([prompt], concepts), variant="paper")
    torch.testing.assert_close(paper[0], want_paper[0])
    with pytest.raises(ValueError, match="ewa='nope'"):
        lp(prompt, num_inference_steps=1, ewa="nope")


def test_cidm_ablation_options(tmp_path):
    """No layer-wise tokens: one token row for all layers; no EWA: the library merges by plain sum."""
    lp = _pipeline()
    options = dict(layerwise_tokens=False, ewa="sum", gamma1=0.0, gamma2=0.0)
    tr = ContinualTrainer(lp, methods.config("cidm", **options), max_steps=2, seed=0, progress=False, run_dir=tmp_path)
    adapter = tr.learn("tw-badge", _images("tw-badge"), "circle")
    assert adapter.token_embeddings.shape[0] == 1 and adapter.metadata["ewa"] == "sum"
    assert lp.library().default_ewa == "sum" and not tr.strategy.r2  # no R2: no closed-form state either
    with pytest.raises(ValueError, match="ewa='max'"):
        methods.config("cidm", ewa="max")
