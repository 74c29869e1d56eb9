"""Lifelong runs on TinyWorld: learn personal concepts one after another with one method, and measure
what the CIDM paper measures. Shared by ``lifelong-engine demo`` and ``bench/quality.py``.

For every concept, the evaluation images are the concept's held-out :func:`~.world.context_prompts`
(backgrounds, corners, a size, a companion object: none is a training caption), each rendered
``samples`` times with fixed seeds, so two evaluations of one concept differ only by the model:

- **IA** (image alignment, like CLIP-I): mean cosine similarity of the evaluator's object embeddings
  between the generated images and the concept's training images;
- **TA** (text alignment): the fraction of the evaluator's checks of what each prompt specifies
  (background, position, size, companion) that hold;
- **forgetting**: IA right after the concept was learned − IA after the last task;
- **base IA**: the same prompts with the token removed (``a circle …``) on the base model, the level
  IA starts from;
- **recognised**: the fraction of those images in which the evaluator's identity head names the
  concept at the object's place; **recognised anywhere**: at any place (the identity drawn, maybe
  where the prompt did not put it — TA checks the place); **parts anywhere**: at any place, every part
  of the identity read right (:meth:`~.evaluator.Prediction.parts_read`; the identity head asks more
  of a blurred image);
- **presence** (multi-concept): two learned concepts, each in its own half of the image through
  regional synthesis; the evaluator's confidence that each concept is in its box (counted at > 0.5);
- **composed** (``custom-diffusion`` only): IA / TA after the last task once the concepts are
  composed by Custom Diffusion's closed-form merge (:func:`~lifelong_engine.training.compose_concepts`,
  200 generic TinyWorld captions as regularisation prompts) instead of summed.

``run_sequence`` returns a JSON-ready report; ``report_markdown`` and ``save_grid`` present it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .. import reference
from .world import (
    CAPTION_STYLES,
    CONCEPTS,
    Concept,
    caption,
    context_prompts,
    get_concept,
    sample_scenes,
    two_concept_layout,
)

__all__ = [
    "SequenceConfig",
    "ewa_argmax",
    "image_grid",
    "report_markdown",
    "run_sequence",
    "save_grid",
    "spread_markdown",
]


@dataclasses.dataclass(frozen=True)
class SequenceConfig:
    """One lifelong run. Training: ``steps`` per concept at ``learning_rate``, LoRA ``rank``, batch
    ``batch_size``, on ``images`` training images per concept captioned in the ``captions`` style
    (:meth:`~.world.Concept.images`); evaluation: ``samples`` images per
    context prompt, ``inference_steps`` DDIM steps at ``guidance_scale``; ``pairs`` two-concept
    layouts of consecutive concepts. ``trainer_options`` go to :class:`ContinualTrainer` as keywords,
    ``method_options`` to the method's hyperparameters (:func:`~lifelong_engine.training.methods.config`),
    ``pipeline_options`` to every generation (e.g. ``{"ewa": "sum"}`` or ``{"alpha": 1.0}``); ``label``
    names the run in reports (default: the method)."""

    method: str = "cidm"
    concepts: tuple[str, ...] = tuple(c.name for c in CONCEPTS)
    images: int = 5
    captions: str = "scene"
    steps: int = 100
    rank: int = 4
    learning_rate: float = 5e-3
    batch_size: int = 4
    seed: int = 0
    samples: int = 2
    inference_steps: int = 20
    guidance_scale: float = 4.0
    pairs: int = 2
    trainer_options: dict = dataclasses.field(default_factory=dict)
    method_options: dict = dataclasses.field(default_factory=dict)
    pipeline_options: dict = dataclasses.field(default_factory=dict)
    label: str = ""

    def __post_init__(self):
        for name in self.concepts:
            get_concept(name)  # KeyError naming the choices
        if len(set(self.concepts)) != len(self.concepts) or not self.concepts:
            raise ValueError(f"concepts: expected distinct names, got {self.concepts}")
        if self.pairs > len(self.concepts) // 2:
            n = len(self.concepts)
            raise ValueError(f"pairs={self.pairs}: {n} concepts make at most {n // 2}")
        if self.captions not in CAPTION_STYLES:
            raise ValueError(f"captions {self.captions!r}: expected one of {CAPTION_STYLES}")
        for field in ("images", "steps", "rank", "batch_size", "samples", "inference_steps"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(self, field)}")


# --------------------------------------------------------------------------------------------- images


def _generate(lp, prompts: Sequence[str], config: SequenceConfig, seed: int, regions=None) -> np.ndarray:
    """(len(prompts) · samples, 32, 32, 3) uint8, prompt-major; seeded per prompt so batches do not matter."""
    generators = [torch.Generator().manual_seed(seed + 1000 * i + k) for i in range(len(prompts))
                  for k in range(config.samples)]  # fmt: skip
    out = lp(
        list(prompts),
        regions=regions,
        num_inference_steps=config.inference_steps,
        guidance_scale=config.guidance_scale,
        num_images_per_prompt=config.samples,
        generator=generators,
        output_type="np",
        **config.pipeline_options,
    ).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def _strip_token(prompt: str, concept: Concept) -> str:
    return prompt.replace(concept.token + " ", "")


def _score(evaluator, concept: Concept, images: np.ndarray, references: np.ndarray, samples: int) -> dict:
    from .evaluator import alignment_checks

    pred = evaluator.predict(images)  # one pass for every image's TA checks
    contexts = [p for p in context_prompts(concept) for _ in range(samples)]
    checks = [alignment_checks(pred[i], p.scene, p.specified) for i, p in enumerate(contexts)]
    by_check: dict[str, list[bool]] = {}
    for c in checks:
        for name, held in c.items():
            by_check.setdefault(name, []).append(held)
    at_slot, anywhere = pred.recognised(concept, [p.scene for p in contexts])
    return {
        "ia": float(evaluator.image_alignment(images, references)),
        "ta": float(np.mean([np.mean(list(c.values())) for c in checks])),
        "ta_checks": {name: float(np.mean(held)) for name, held in sorted(by_check.items())},
        "recognised": float(np.mean(at_slot)),
        "recognised_anywhere": float(np.mean(anywhere)),
        "parts_anywhere": float(np.mean(pred.parts_read(concept))),
    }


def _evaluate(lp, evaluator, concept: Concept, references: np.ndarray, config: SequenceConfig, base=False) -> tuple:
    prompts = [p.prompt for p in context_prompts(concept)]
    if base:
        prompts = [_strip_token(p, concept) for p in prompts]
    images = _generate(lp, prompts, config, seed=config.seed + 17)
    return _score(evaluator, concept, images, references, config.samples), images


# --------------------------------------------------------------------------------------------- the run


def run_sequence(
    lp,
    evaluator,
    config: SequenceConfig,
    *,
    store=None,
    run_dir: str | os.PathLike | None = None,
    progress: bool = True,
    on_update: Callable[[dict], None] | None = None,
) -> tuple[dict, dict]:
    """Learn ``config.concepts`` in order into ``lp`` (a LifelongPipeline over the TinyWorld model)
    and evaluate. Returns ``(report, images)``: the JSON-ready report and the evaluation images
    (``"references"``/``"final"`` per concept, ``"pairs"``) for :func:`save_grid`. ``on_update`` is
    called with the report after every task (to save partial results)."""
    from tqdm.auto import tqdm

    from ..training import ContinualTrainer, methods

    if lp.concepts:
        raise ValueError(f"run_sequence: the pipeline already has concepts {sorted(lp.concepts)}; start from the base")
    concepts = [get_concept(n) for n in config.concepts]
    trainer = ContinualTrainer(
        lp,
        method=methods.config(config.method, **config.method_options),
        rank=config.rank,
        max_steps=config.steps,
        learning_rate=config.learning_rate,
        batch_size=config.batch_size,
        store=store,
        seed=config.seed,
        run_dir=run_dir,
        progress=progress,
        **config.trainer_options,
    )
    lp.pipe.set_progress_bar_config(disable=True)
    report: dict = {
        "method": config.label or config.method,
        "config": dataclasses.asdict(config),
        "concepts": {},
        "status": "running",
    }
    references = {c.name: np.stack([np.asarray(s.image) for s in c.images(config.images, seed=config.seed)])
                  for c in concepts}  # fmt: skip
    images: dict = {"references": references, "final": {}, "pairs": [], "base": {}}
    started = time.perf_counter()
    base = {}
    with torch.no_grad():  # the base model, before any task
        for c in concepts:
            base[c.name], images["base"][c.name] = _evaluate(lp, evaluator, c, references[c.name], config, base=True)
    for index, concept in enumerate(tqdm(concepts, desc=f"{config.method}: tasks", disable=not progress)):
        entry: dict = {"task": index + 1, "class_word": concept.class_word, "base": base[concept.name]}
        samples = concept.images(config.images, seed=config.seed, captions=config.captions)
        t0 = time.perf_counter()
        trainer.learn(concept.name, [s.image for s in samples], concept.class_word, [s.caption for s in samples])
        stats = trainer.stats[concept.name]
        entry["train_seconds"] = round(time.perf_counter() - t0, 2)
        entry["steps_per_second"] = round(stats.steps_per_second, 2)
        entry["final_loss"] = round(stats.final_loss, 5)
        with torch.no_grad():
            entry["after_learning"] = _evaluate(lp, evaluator, concept, references[concept.name], config)[0]
        report["concepts"][concept.name] = entry
        if on_update is not None:
            on_update(report)

    with torch.no_grad():
        for concept in tqdm(concepts, desc=f"{config.method}: final evaluation", disable=not progress):
            entry = report["concepts"][concept.name]
            entry["final"], images["final"][concept.name] = _evaluate(
                lp, evaluator, concept, references[concept.name], config
            )
            entry["forgetting"] = entry["after_learning"]["ia"] - entry["final"]["ia"]
        report["pairs"] = []
        for first, second in zip(concepts[0 : 2 * config.pairs : 2], concepts[1 : 2 * config.pairs : 2]):
            layout = two_concept_layout(first, second, background="white")
            regions = [(r.prompt, r.box) for r in layout.regions]
            generated = _generate(lp, [layout.prompt], config, seed=config.seed + 29, regions=regions)
            presence = [[evaluator.presence(im, r.box, c) for r, c in zip(layout.regions, (first, second))]
                        for im in generated]  # fmt: skip
            report["pairs"].append({
                "concepts": [first.name, second.name],
                "prompt": layout.prompt,
                "presence": [float(np.mean([p[j] for p in presence])) for j in range(2)],
                "both_present": float(np.mean([min(p) > 0.5 for p in presence])),
            })  # fmt: skip
            images["pairs"].append((layout, generated))
        if config.method == "custom-diffusion":
            _evaluate_composed(lp, evaluator, concepts, references, config, report)
        report["ewa"] = ewa_argmax(lp, concepts)
    report["summary"] = _summary(report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["status"] = "finished"
    if on_update is not None:
        on_update(report)
    return report, images


@torch.no_grad()
def ewa_argmax(lp, concepts: Sequence[Concept]) -> dict:
    """EWA on single-concept prompts (every context prompt that names one concept), with every
    learned concept in the library: the fraction of (prompt, layer) pairs in which the named
    concept gets the largest weight ψ (``argmax_rate``; chance 1/G), and the mean ψ of the named
    concept and of the largest other one (paper settings: power 2, Frobenius norm).

    What ψ is made of, to see what limits it: M = max over the prompt's words and EOS of the cosine
    to a concept's ê (DESIGN §3.3), its mean for the named concept (``cosine_named``), for the
    closest other concept (``cosine_largest_other``), over every concept for generic captions that
    name none (``cosine_no_concept``), and the mean cosine between the ê of two concepts
    (``cosine_between_concepts``); ``argmax_most_won``, the share of pairs won by the concept that
    wins most (1/G when the wins spread, 1 when one concept takes every prompt). Two readings of M
    that EWA does not make, to see where it fails (the formula is the paper's and stays):
    ``argmax_concept_words``, M with the max over the prompt's concept-token positions only (are
    the ê themselves distinct?), and ``argmax_centred``, M after the mean row of the generic
    captions is taken from every row and every ê (is a common direction, shared by every encoded
    word, what makes all cosines alike?). ``lost_at``: in the pairs where another concept has the
    largest M, the share in which its match is on the named concept's own words, on the prompt's
    first word (right after BOS, where a concept's words stand when ê is encoded alone), on the EOS,
    or on another word (None when the named concept always wins); ``argmax_without_first_word``, M
    with the max over every word but the first."""
    library = lp.library()
    index = {a.name: i for i, a in enumerate(library.adapters)}
    prompts, named = [], []
    for concept in concepts:
        for context in context_prompts(concept):
            prompts.append(context.prompt)
            named.append(index[concept.name])
    generic = [caption(s) for s in sample_scenes(16, seed=31)]
    encoded = lp.encode_prompt(prompts + generic, library)
    _, psi = lp.concept_weights(encoded, library=library)  # (n, L, G), in library order
    psi = psi[: len(prompts)]
    target = torch.tensor(named, device=psi.device)[:, None].expand(psi.shape[:2])
    own = psi.gather(-1, target[..., None]).squeeze(-1)
    others = psi.scatter(-1, target[..., None], float("-inf")).amax(-1)
    e = library.embeddings.float()  # (L, G, D)
    rows, mask = encoded.per_layer.float(), encoded.ewa_mask
    m = reference.ewa_similarity(rows, e, mask)  # (n, L, G)
    m_prompts = m[: len(prompts)]
    m_words = reference.ewa_similarity(rows[: len(prompts)], e, encoded.concept_mask[: len(prompts)])
    generic_mask = mask[len(prompts) :, None, :, None].float()
    mean_row = (rows[len(prompts) :] * generic_mask).sum((0, 2)) / generic_mask.sum((0, 2))  # (L, D)
    m_centred = reference.ewa_similarity(
        rows[: len(prompts)] - mean_row[:, None], e - mean_row[:, None], mask[: len(prompts)]
    )
    g, n = e.shape[1], len(prompts)
    without_first = mask[:n].clone()
    without_first[:, 1] = False
    m_without_first = reference.ewa_similarity(rows[:n], e, without_first)
    e = torch.nn.functional.normalize(e, dim=-1)
    between = torch.einsum("lgd,lhd->lgh", e, e)[:, ~torch.eye(g, dtype=torch.bool, device=e.device)]
    # where in the prompt the concept with the largest M found its match, in the pairs it is not the named one
    cos = torch.einsum("nltd,lgd->nlgt", torch.nn.functional.normalize(rows[:n], dim=-1), e)
    cos = cos.masked_fill(~mask[:n, None, None, :], -2.0)
    winner = m_prompts.argmax(-1)  # (n, L)
    where = cos.gather(2, winner[:, :, None, None].expand(-1, -1, 1, cos.shape[-1]))[:, :, 0].argmax(-1)
    lost = winner != target
    at_words = encoded.concept_mask[:n].gather(1, where)[lost]
    at_first = (where == 1)[lost] & ~at_words  # the prompt's first word, right after BOS
    at_eos = (where == encoded.eos[:n, None])[lost]
    lost_at = None
    if lost.any():
        lost_at = {
            "concept_words": float(at_words.float().mean()),
            "first_word": float(at_first.float().mean()),
            "eos": float(at_eos.float().mean()),
            "other_words": float((~at_words & ~at_first & ~at_eos).float().mean()),
        }
    return {
        "prompts": len(prompts),
        "layers": int(psi.shape[1]),
        "concepts": int(psi.shape[2]),
        "argmax_rate": float((psi.argmax(-1) == target).float().mean()),
        # the share of (prompt, layer) pairs won by the concept that wins most: 1/G if ψ spreads its wins
        "argmax_most_won": float(torch.bincount(psi.argmax(-1).flatten(), minlength=g).max() / psi[..., 0].numel()),
        "argmax_concept_words": float((m_words.argmax(-1) == target).float().mean()),
        "argmax_centred": float((m_centred.argmax(-1) == target).float().mean()),
        "argmax_without_first_word": float((m_without_first.argmax(-1) == target).float().mean()),
        "psi_named": float(own.mean()),
        "psi_largest_other": float(others.mean()),
        "cosine_named": float(m_prompts.gather(-1, target[..., None]).mean()),
        "cosine_largest_other": float(m_prompts.scatter(-1, target[..., None], -2.0).amax(-1).mean()),
        "cosine_no_concept": float(m[len(prompts) :].mean()),
        "cosine_between_concepts": float(between.mean()) if between.numel() else None,
        "lost_at": lost_at,
    }


def _evaluate_composed(lp, evaluator, concepts, references, config, report) -> None:
    """Custom Diffusion's multi-concept inference: compose the learned concepts, evaluate each
    (``final_composed``), then put the learned concepts back."""
    from ..training import compose_concepts

    names = [c.name for c in concepts]
    learned = [lp.concepts[n] for n in names]
    captions = [caption(s) for s in sample_scenes(200, seed=config.seed + 7)]
    for composed in compose_concepts(lp, names, captions):
        lp.add_concept(composed, replace=True)
    try:
        for concept in concepts:
            entry = report["concepts"][concept.name]
            entry["final_composed"] = _evaluate(lp, evaluator, concept, references[concept.name], config)[0]
    finally:
        for adapter in learned:
            lp.add_concept(adapter, replace=True)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return round(float(np.mean(values)), 4) if values else None


def _summary(report: dict) -> dict:
    entries = list(report["concepts"].values())
    last = entries[-1] if entries else None
    return {
        "ia_after_learning": _mean(e["after_learning"]["ia"] for e in entries),
        "ta_after_learning": _mean(e["after_learning"]["ta"] for e in entries),
        "ia_final": _mean(e["final"]["ia"] for e in entries),
        "ta_final": _mean(e["final"]["ta"] for e in entries),
        "base_ia": _mean(e["base"]["ia"] for e in entries),
        "base_ta": _mean(e["base"]["ta"] for e in entries),
        "recognised_after_learning": _mean(e["after_learning"].get("recognised") for e in entries),
        "recognised_final": _mean(e["final"].get("recognised") for e in entries),
        "base_recognised": _mean(e["base"].get("recognised") for e in entries),
        "recognised_anywhere_after_learning": _mean(e["after_learning"].get("recognised_anywhere") for e in entries),
        "recognised_anywhere_final": _mean(e["final"].get("recognised_anywhere") for e in entries),
        "base_recognised_anywhere": _mean(e["base"].get("recognised_anywhere") for e in entries),
        "parts_anywhere_after_learning": _mean(e["after_learning"].get("parts_anywhere") for e in entries),
        "parts_anywhere_final": _mean(e["final"].get("parts_anywhere") for e in entries),
        "base_parts_anywhere": _mean(e["base"].get("parts_anywhere") for e in entries),
        # the last task cannot have been forgotten yet; average over the earlier ones
        "forgetting": _mean(e["forgetting"] for e in entries if e is not last),
        "presence": _mean(p for pair in report.get("pairs", []) for p in pair["presence"]),
        "both_present": _mean(pair["both_present"] for pair in report.get("pairs", [])),
        "ewa_argmax": (report.get("ewa") or {}).get("argmax_rate"),
        "ia_composed": _mean(e["final_composed"]["ia"] for e in entries if "final_composed" in e),
        "ta_composed": _mean(e["final_composed"]["ta"] for e in entries if "final_composed" in e),
        # TA check by check (background, position, size, companion), over the concepts
        **{f"ta_checks_{when}": _checks([e[when] for e in entries]) for when in ("base", "after_learning", "final")},
    }


def _checks(scores: list[dict]) -> dict | None:
    names = sorted({name for s in scores for name in s.get("ta_checks", {})})
    return {n: _mean(s["ta_checks"].get(n) for s in scores if "ta_checks" in s) for n in names} or None


# --------------------------------------------------------------------------------------------- output


_READINGS = ("recognised", "recognised_anywhere", "parts_anywhere")


def report_markdown(reports: Sequence[dict], title: str) -> str:
    """A CIDM-paper style table: one row per method (IA/TA after the last task, forgetting,
    multi-concept presence), then IA per concept per method."""
    head = ("| method | IA ↑ | TA ↑ | forgetting ↓ | IA right after learning | base IA "
            "| recognised ↑ at its place / anywhere / part by part | the same right after learning "
            "| presence ↑ | both present ↑ |")  # fmt: skip
    lines = [f"# {title}", "", head, "|" + "---|" * 10]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for r in reports:
        s = r["summary"]
        final, after = (
            " / ".join(fmt(s.get(f"{key}_{when}")) for key in _READINGS) for when in ("final", "after_learning")
        )
        lines.append(
            f"| {r['method']} | {fmt(s['ia_final'])} | {fmt(s['ta_final'])} | {fmt(s['forgetting'])} | "
            f"{fmt(s['ia_after_learning'])} | {fmt(s['base_ia'])} | {final} | {after} | "
            f"{fmt(s['presence'])} | {fmt(s['both_present'])} |"
        )
        if s.get("ia_composed") is not None:
            lines.append(
                f"| {r['method']}, composed | {fmt(s['ia_composed'])} | {fmt(s['ta_composed'])} | | | | | | | |"
            )
    names = list(reports[0]["concepts"]) if reports else []
    lines += ["", "IA / TA per concept after the last task (forgetting in brackets):", ""]
    lines += ["| method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for r in reports:
        cells = []
        for n in names:
            e = r["concepts"][n]
            cells.append(f"{e['final']['ia']:.2f} / {e['final']['ta']:.2f} ({e['forgetting']:+.2f})")
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    for r in reports:
        if r.get("pairs"):
            pairs = ", ".join(f"{' + '.join(p['concepts'])}: {p['presence'][0]:.2f} / {p['presence'][1]:.2f}"
                              for p in r["pairs"])  # fmt: skip
            lines.append(f"\n{r['method']} presence per pair (left / right): {pairs}")
    return "\n".join(lines) + "\n"


#: (summary key, column, True when higher is better): the columns of :func:`spread_markdown`
_SPREAD = (
    ("ia_final", "IA ↑", True),
    ("ta_final", "TA ↑", True),
    ("forgetting", "forgetting ↓", False),
    ("recognised_anywhere_final", "recognised anywhere ↑", True),
    ("parts_anywhere_final", "part by part ↑", True),
)


def spread_markdown(runs: Sequence[dict], rows: Sequence[str], reference: str = "cidm") -> str:
    """The same table rows run under several seeds: ``runs`` holds one ``{row: report}`` per seed.
    Every row finished under every seed gets its mean and range (min–max) per column; then, per
    baseline, how many seeds ``reference`` beats it in and the mean margin (positive: ``reference``
    better)."""
    finished = [r for r in rows if all(run.get(r, {}).get("status") == "finished" for run in runs)]
    seeds = [next(iter(run.values()))["config"]["seed"] for run in runs]
    first = runs[0][finished[0]]["config"] if finished else {}
    title = (f"# TinyWorld lifelong quality over {len(runs)} seeds ({', '.join(map(str, seeds))}): "
             f"{len(first.get('concepts', ()))} concepts, {first.get('steps')} steps each")  # fmt: skip
    lines = [title, "", "Each cell: the mean over the seeds, then the least and the most in brackets.", ""]
    lines += ["| method | " + " | ".join(c for _, c, _ in _SPREAD) + " |", "|" + "---|" * (len(_SPREAD) + 1)]
    values = {r: {k: [run[r]["summary"].get(k) for run in runs] for k, _, _ in _SPREAD} for r in finished}
    for r in finished:
        cells = []
        for key, _, _ in _SPREAD:
            v = values[r][key]
            cells.append("n/a" if None in v else f"{np.mean(v):.3f} ({min(v):.3f}–{max(v):.3f})")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    if reference in finished:
        lines += ["", f"{reference} against each row: the seeds it is better in, of {len(runs)}, and the mean "
                  f"margin ({reference}'s better side positive).", ""]  # fmt: skip
        lines += ["| against | " + " | ".join(c for _, c, _ in _SPREAD) + " |", "|" + "---|" * (len(_SPREAD) + 1)]
        for r in finished:
            if r == reference:
                continue
            cells = []
            for key, _, higher in _SPREAD:
                ours, theirs = values[reference][key], values[r][key]
                if None in ours or None in theirs:
                    cells.append("n/a")
                    continue
                margins = [(a - b) if higher else (b - a) for a, b in zip(ours, theirs)]
                cells.append(f"{sum(m > 0 for m in margins)} of {len(runs)}, {np.mean(margins):+.3f}")
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
    checks = sorted({n for r in finished for run in runs for n in (run[r]["summary"].get("ta_checks_final") or {})})
    if checks:
        lines += ["", "TA check by check after the last task (the mean over the seeds that recorded it; "
                  "base: the base model on the same prompts without the token):", ""]  # fmt: skip
        lines += ["| method | " + " | ".join(checks) + " |", "|" + "---|" * (len(checks) + 1)]
        for label, row, key in [("base", finished[0], "ta_checks_base")] + [
            (r, r, "ta_checks_final") for r in finished
        ]:
            recorded = [run[row]["summary"].get(key) or {} for run in runs]
            cells = []
            for n in checks:
                v = [c[n] for c in recorded if c.get(n) is not None]
                cells.append(f"{np.mean(v):.3f}" if v else "n/a")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    missing = [r for r in rows if r not in finished and any(r in run for run in runs)]
    if missing:
        lines += ["", "Not finished under every seed, left out: " + ", ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def short_label(context) -> str:
    """A few words for a :class:`~.world.ContextPrompt`: what it asks beyond the concept."""
    scene, words = context.scene, []
    obj = scene.objects[0]
    if "size" in context.specified:
        words.append(obj.size)
    if "position" in context.specified:
        words.append(obj.position)
    if "background" in context.specified:
        words.append(f"on {scene.background}")
    if "companion" in context.specified:
        words.append(f"+ {scene.objects[1].colour} {scene.objects[1].shape}")
    return ", ".join(words)


def save_grid(images: dict, path: str | os.PathLike, scale: int = 3, per_concept: int = 8) -> Path:
    """A picture of the run, every image labelled with (a short form of) its prompt: per concept a
    row with its first training image, then generated images of its held-out context prompts after
    the last task, and below it the base model's attempt at the same prompts without the token;
    then the two-concept images, each concept prompted in its own half. ``scale``× nearest upscale."""
    rows, blank = [], np.full((32, 32, 3), 255, dtype=np.uint8)
    for name, generated in images["final"].items():
        concept = get_concept(name)
        contexts = context_prompts(concept)
        samples = max(1, len(generated) // len(contexts))
        picks = list(range(0, len(generated), samples))[:per_concept]  # the first sample of each prompt
        labels = [short_label(contexts[i // samples]) for i in picks]
        rows.append((f"{concept.token} learned", [images["references"][name][0], None, *(generated[i] for i in picks)],
                     ["training image", None, *labels]))  # fmt: skip
        if name in images.get("base", {}):
            base = images["base"][name]
            rows.append(
                (f"base: a {concept.class_word}", [blank, None, *(base[i] for i in picks)], [None, None, *labels])
            )
    for layout, generated in images["pairs"]:
        names = " | ".join(r.prompt.split()[1] for r in layout.regions)
        rows.append(
            (f"regions: {names}", list(generated[:per_concept]), ["left | right"] * len(generated[:per_concept]))
        )
    return image_grid(rows, path, scale)


def image_grid(rows: Sequence[tuple], path: str | os.PathLike, scale: int = 3) -> Path:
    """Save labelled rows of 32×32 uint8 images as PNG, ``scale``× nearest upscale. A row is
    ``(name, images)`` or ``(name, images, captions)``: an image None leaves a small gap, a caption
    is written under its tile."""
    from PIL import Image, ImageDraw

    tile, gap, label = 32 * scale, 4 * scale, 72 * scale
    captioned = any(len(r) > 2 for r in rows)
    text_h = 12 if captioned else 0
    width = label + max((len(r[1]) for r in rows), default=1) * (tile + gap)
    canvas = Image.new("RGB", (width, len(rows) * (tile + gap + text_h) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        name, tiles = row[0], row[1]
        captions = row[2] if len(row) > 2 else [None] * len(tiles)
        y = gap + i * (tile + gap + text_h)
        draw.text((gap, y + tile // 2 - 5), name, fill="black")
        x = label
        for im, text in zip(tiles, captions):
            if im is None:  # a gap between the training image and the generated ones
                x += 2 * gap
                continue
            canvas.paste(Image.fromarray(im).resize((tile, tile), Image.NEAREST), (x, y))
            if text:
                draw.text((x, y + tile + 1), text[: tile // 6], fill="black")
            x += tile + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def write_json(obj, path: str | os.PathLike) -> None:
    """Write ``obj`` as JSON through a temp file and rename (a crash leaves the old file or the new)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
