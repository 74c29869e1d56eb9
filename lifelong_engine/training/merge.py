"""Custom Diffusion's closed-form composition of several learned concepts (Kumari et al., CVPR 2023, §3.2).

Each concept i was learned as its own K/V weights W_i = W0 + ΔW_i. Summed, the deltas interfere: the
prompt of one concept also goes through the other concepts' deltas, and so does every other prompt.
The composition finds, per attn2 layer and projection, the one weight

    W = argmin ‖W·C_regᵀ − W0·C_regᵀ‖_F   s.t.   W·C_iᵀ = W_i·C_iᵀ  for every concept i,

so each concept's own prompt features C_i map exactly as under its own weights while generic prompts
(C_reg, the regularisation captions) map as under the base model (:func:`losses.custom_diffusion_merge`).
As in the paper's code, C_i holds the text-encoder outputs of "<token> class" and "photo of a <token>
class" from the concept's token on (EOS included), C_reg those of the captions' words and EOS.

The update W − W0 = Λ·D splits exactly into one term per concept of rank ≤ n_i (the number of rows in
C_i): the update on concept i's directions, orthogonal to the other concepts' (see ``_split``). So
:func:`compose_concepts` returns the concepts themselves, each with its part as LoRA factors: summed
(``ewa=False``, the default for any library that is not all CIDM) they give W.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from ..concepts import ConceptAdapter
from . import losses

__all__ = ["compose_concepts"]

_KV = ("to_k", "to_v")


def compose_concepts(
    pipeline, names: Sequence[str], regularization_prompts: Sequence[str], *, eps: float = 1e-6
) -> list[ConceptAdapter]:
    """Compose the concepts ``names`` of ``pipeline`` (a LifelongPipeline) by Custom Diffusion's merge.

    regularization_prompts: generic captions whose K/V must stay the base model's (the paper uses 200
    captions of its regularisation images); eps: ridge term of the merge (needed when the captions
    have fewer token rows than the text width). Returns one adapter per name, in order: same name,
    token, words and token rows, K/V LoRA factors holding its part of the merged update, method
    ``custom-diffusion`` and ``metadata["composed_with"]``. The pipeline is not changed; install the
    result with ``add_concept(c, replace=True)``, and generate with the plain sum (``ewa=False``, the
    default unless every concept of the library is CIDM's). Concepts of the library that are not in
    ``names`` still add their own deltas on top. Each concept's target is its own W0 + ΔW_i (C-LoRA's
    cumulative weights are not reconstructed).
    """
    names = list(names)
    prompts = list(regularization_prompts)
    if not names:
        raise ValueError("compose_concepts: names is empty; give the concepts to compose")
    if len(set(names)) != len(names):
        raise ValueError(f"compose_concepts: names repeats a concept: {names}")
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("compose_concepts: regularization_prompts must be a non-empty list of non-empty captions")
    concepts = pipeline.concepts
    unknown = [n for n in names if n not in concepts]
    if unknown:
        raise KeyError(f"compose_concepts: no concept {unknown} in the pipeline (it has {sorted(concepts)})")
    chosen = [concepts[n] for n in names]
    for c in chosen:
        extra = [p for p in c.projections if p not in _KV]
        if extra:
            raise ValueError(
                f"compose_concepts: concept {c.name!r} also adapts {extra}; the merge covers attn2 to_k / to_v only"
            )

    with torch.no_grad():
        c_reg = _rows(pipeline, prompts, from_concept=False)  # (L, n_reg, D)
        targets = []
        for c in chosen:
            subject = f"{c.token} {c.class_word}" if c.class_word else c.token
            targets.append(_rows(pipeline, [subject, f"photo of a {subject}"], from_concept=True))
        targets = _drop_repeated_rows(targets)
        for c, rows in zip(chosen, targets):
            if rows.shape[1] == 0:
                raise ValueError(
                    f"compose_concepts: the prompt features of {c.name!r} are the same as those of another "
                    "concept in names (the same learned concept twice?)"
                )
        shares: list[dict[str, tuple[Tensor, Tensor]]] = [{} for _ in chosen]
        for l, layer in enumerate(pipeline.layers):
            attn = pipeline.attention[layer]
            for proj in _KV:
                w0 = getattr(attn, proj).weight.detach().to(torch.float64)
                own = [(w0 + _delta64(c, layer, proj), rows[l]) for c, rows in zip(chosen, targets)]
                lam, d = losses.custom_diffusion_merge_factors(w0, c_reg[l], own, eps)
                for i, factors in enumerate(_split(lam, d, [rows.shape[0] for _, rows in own])):
                    shares[i][f"{layer}.{proj}"] = factors

    out = []
    for c, share in zip(chosen, shares):
        rank = max(a.shape[0] for a, _ in share.values())
        lora = {}
        for key, (a, b) in share.items():
            pad = rank - a.shape[0]
            dtype = c.lora[f"{key}.lora_A.weight"].dtype
            lora[f"{key}.lora_A.weight"] = torch.nn.functional.pad(a, (0, 0, 0, pad)).to(dtype)
            lora[f"{key}.lora_B.weight"] = torch.nn.functional.pad(b, (0, pad)).to(dtype)
        others = ",".join(n for n in names if n != c.name)
        out.append(
            dataclasses.replace(
                c,
                lora=lora,
                rank=rank,
                alpha=float(rank),
                method="custom-diffusion",
                metadata={**c.metadata, "composed_with": others, "composed_from_method": c.method},
            )
        )
    return out


def _rows(pipeline, prompts: list[str], from_concept: bool) -> Tensor:
    """(L, rows, D) float64 text features of ``prompts``: each prompt's words and EOS, or (from_concept)
    its tokens from the first concept-token row through EOS (all its words when it has none)."""
    enc = pipeline.encode_prompt(prompts)
    pos = torch.arange(enc.per_layer.shape[2], device=enc.eos.device)
    keep = enc.ewa_mask
    if from_concept:  # a concept without learned token rows (a trigger word) keeps the whole prompt
        first = torch.where(enc.concept_mask.any(1), enc.concept_mask.float().argmax(1), 0)
        keep = keep & (pos[None] >= first[:, None])
    per_layer = enc.per_layer.to(torch.float64)  # (n, L, T, D)
    return torch.cat([per_layer[p][:, keep[p]] for p in range(len(prompts))], dim=1)


def _delta64(concept: ConceptAdapter, layer: str, proj: str) -> Tensor:
    """The concept's dense delta in float64 (its factors may be half precision on a GPU)."""
    a, b = concept.factors(layer, proj)
    return concept.scale * (b.to(torch.float64) @ a.to(torch.float64))


def _drop_repeated_rows(targets: list[Tensor]) -> list[Tensor]:
    """Remove rows equal (in every layer) to an earlier row of any concept, as the paper's code does:
    a repeated constraint makes the merge's system singular."""
    seen: list[Tensor] = []
    out = []
    for rows in targets:
        keep = []
        for j in range(rows.shape[1]):
            row = rows[:, j]
            if not any(torch.equal(row, s) for s in seen):
                seen.append(row)
                keep.append(j)
        out.append(rows[:, keep])
    return out


def _split(lam: Tensor, d: Tensor, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    """Λ·D as one LoRA term per concept, (A (n_i, Din), B (Dout, n_i)), that sum to it exactly.

    Dᵀ = Q·R (QR, columns in concept order) gives orthonormal directions Q_i for concept i's rows of D,
    orthogonalised against the earlier concepts'. The rows of Λ·D lie in their span, so
    Λ·D = Σ_i (Λ·D·Q_i)·Q_iᵀ. Each term is a projection of the update, never larger than it, so the
    terms do not cancel and survive half precision (the algebraic split Λ_i·D_i can be far larger
    than the update when concepts' rows are alike); A = Q_iᵀ is orthonormal.
    """
    delta = lam @ d
    q, _ = torch.linalg.qr(d.T)  # (Din, m)
    out, start = [], 0
    for n in sizes:
        q_i = q[:, start : start + n]
        out.append((q_i.T, delta @ q_i))
        start += n
    return out
