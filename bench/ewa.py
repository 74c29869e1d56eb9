"""Kernel benchmark, EWA: the fused ops against the reference, torch.compile and the Python loop
one writes without them: ψ of G = 10/100/1000 concepts for B samples × 16 layers (ewa_weights), and
the ψ-weighted merge of G = 10/100/1000 adapters into dense deltas (ewa_merge).

    python bench/ewa.py [--quick] [--dtype bf16|fp16|fp32] [--out DIR] [--list]

Writes ewa_weights.jsonl and ewa_merge.jsonl under bench/results/<device-slug>/. The checks, the
timing, the records and the options are shared by every kernel benchmark (bench/common.py,
kernel_main); see bench/README.md for what each provider is.
"""

from __future__ import annotations

import sys

import common
import torch
import torch.nn.functional as F
from common import (
    BATCHES,
    LORA_ALPHA,
    LORA_RANK,
    TEXT_LEN,
    Case,
    Prepared,
    Provider,
    compiled,
    kernel,
    ours,
    ours_cpu,
    randn,
)

common.ensure_engine_importable()


from lifelong_engine import ops, reference  # noqa: E402

EWA_LAYERS, EWA_DIM = 16, 768
EWA_CONCEPTS = (10, 100, 1000)
MERGE_SHAPES = ((320, 768), (1280, 768), (1280, 2048))  # (Dout, Din)
MERGE_BATCHES = (1, 8)

# ---------------------------------------------------------------------------------- EWA


def _ewa_args(i: dict) -> tuple:
    return i["prompt"], i["concepts"], i["prompt_mask"], i["power"], i["norm"]


def ewa_weights_loop(prompt, concepts, prompt_mask=None, power=2.0, norm="fro"):
    """What one writes without a fused op: a Python loop over concepts, cosine max per concept."""
    m = prompt.new_empty(prompt.shape[0], prompt.shape[1], concepts.shape[1])
    keep = None if prompt_mask is None else prompt_mask[:, None, :]
    for g in range(concepts.shape[1]):
        cos = F.cosine_similarity(prompt, concepts[None, :, None, g], dim=-1)  # (B, L, T)
        if keep is not None:
            cos = cos.masked_fill(~keep, float("-inf"))
        m[..., g] = cos.amax(-1)
    m_pow = m.pow(power)
    total = m_pow.norm(dim=-1, keepdim=True) if norm == "fro" else m_pow.abs().sum(-1, keepdim=True)
    return m_pow / total


def _w_ours(i, ctx):
    return ours(ops.ewa_weights, *_ewa_args(i), ctx=ctx)


def _w_kernel(i, ctx):
    return kernel("ewa", "ewa_weights", *_ewa_args(i), ctx=ctx)


def _w_reference(i, ctx):
    args = _ewa_args(i)
    return Prepared(lambda: reference.ewa_weights(*args))


def _w_compile(i, ctx):
    return compiled(reference.ewa_weights, *_ewa_args(i))


def _w_loop(i, ctx):
    args = _ewa_args(i)
    return Prepared(lambda: ewa_weights_loop(*args))


EWA_WEIGHTS_PROVIDERS = [
    Provider("ours", _w_ours),
    Provider("ours_kernel", _w_kernel),
    Provider("reference", _w_reference),
    Provider("compile", _w_compile),
    Provider("loop", _w_loop),
]


def ewa_weights_case(bsz: int, layers: int, dim: int, n_concepts: int, t_len: int = TEXT_LEN) -> Case:
    def make(device, dtype):
        lengths = torch.randint(6, 21, (bsz,))  # a prompt of 6–20 tokens, the rest padding
        return {
            "prompt": randn(bsz, layers, t_len, dim, device=device, dtype=dtype),
            "concepts": randn(layers, n_concepts, dim, device=device, dtype=dtype),
            "prompt_mask": (torch.arange(t_len)[None, :] < lengths[:, None]).to(device),
            "power": 2.0,
            "norm": "fro",
        }

    def cost(i):
        elt = i["prompt"].element_size()
        n_bytes = elt * (bsz * layers * t_len * dim + layers * n_concepts * dim + bsz * layers * n_concepts)
        return n_bytes + bsz * t_len, 2 * bsz * layers * t_len * n_concepts * dim

    shape = {"B": bsz, "L": layers, "T": t_len, "D": dim, "G": n_concepts, "power": 2.0, "norm": "fro"}
    label = f"B={bsz} L={layers} D={dim} G={n_concepts}"
    ref = lambda i: reference.ewa_weights(*_ewa_args(i))  # noqa: E731
    return Case("ewa_weights", label, shape, make, ref, cost, EWA_WEIGHTS_PROVIDERS)


def ewa_merge_loop(psi, a, b, scale=1.0):
    """The per-adapter loop: delta += psi[:, g]·scale·(b[g] @ a[g]). Accumulates in fp32: in
    bf16 the running sum drifts by several % over 1000 adapters and fails the check."""
    delta = torch.zeros(psi.shape[0], b.shape[1], a.shape[2], dtype=torch.float32, device=a.device)
    for g in range(a.shape[0]):
        delta += psi[:, g, None, None].to(a.dtype) * scale * (b[g] @ a[g])
    return delta.to(a.dtype)


def _m_ours(i, ctx):
    return ours(ops.ewa_merge, i["psi"], i["a"], i["b"], i["scale"], ctx=ctx)


def _m_cpu(i, ctx):
    return ours_cpu(ops.ewa_merge, i["psi"], i["a"], i["b"], i["scale"], ctx=ctx)


def _m_kernel(i, ctx):
    return kernel("ewa", "ewa_merge", i["psi"], i["a"], i["b"], i["scale"], ctx=ctx)


def _m_reference(i, ctx):
    return Prepared(lambda: reference.ewa_merge(i["psi"], i["a"], i["b"], i["scale"]))


def _m_loop(i, ctx):
    return Prepared(lambda: ewa_merge_loop(i["psi"], i["a"], i["b"], i["scale"]))


EWA_MERGE_PROVIDERS = [
    Provider("ours", _m_ours),
    Provider("ours_cpu", _m_cpu),
    Provider("ours_kernel", _m_kernel),
    Provider("reference", _m_reference),
    Provider("loop", _m_loop),
]


def ewa_merge_case(bsz: int, n_concepts: int, dout: int, din: int, rank: int = LORA_RANK) -> Case:
    def make(device, dtype):
        psi = torch.rand(bsz, n_concepts, device=device)
        return {
            "psi": (psi / psi.norm(dim=-1, keepdim=True)).to(dtype),  # like ewa_weights' L2-normalised ψ
            "a": randn(n_concepts, rank, din, device=device, dtype=dtype, std=din**-0.5),
            "b": randn(n_concepts, dout, rank, device=device, dtype=dtype, std=rank**-0.5),
            "scale": LORA_ALPHA / LORA_RANK,
        }

    def cost(i):
        elt = i["a"].element_size()
        n_bytes = elt * (bsz * n_concepts + n_concepts * rank * (din + dout) + bsz * dout * din)
        return n_bytes, 2 * bsz * dout * din * n_concepts * rank

    shape = {"B": bsz, "G": n_concepts, "r": rank, "Dout": dout, "Din": din}
    label = f"Dout={dout} Din={din} B={bsz} G={n_concepts}"
    ref = lambda i: reference.ewa_merge(i["psi"], i["a"], i["b"], i["scale"])  # noqa: E731
    return Case("ewa_merge", label, shape, make, ref, cost, EWA_MERGE_PROVIDERS)


def ewa_weights_cases(quick: bool, models: set[str], batches: set[int]) -> list[Case]:
    if quick:
        return [ewa_weights_case(2, 4, 64, 10)]
    return [ewa_weights_case(bsz, EWA_LAYERS, EWA_DIM, g) for bsz in BATCHES if bsz in batches for g in EWA_CONCEPTS]


def ewa_merge_cases(quick: bool, models: set[str], batches: set[int]) -> list[Case]:
    if quick:
        return [ewa_merge_case(2, 10, 32, 64), ewa_merge_case(2, 100, 32, 64)]
    return [
        ewa_merge_case(bsz, g, dout, din)
        for dout, din in MERGE_SHAPES
        for bsz in MERGE_BATCHES
        if bsz in batches
        for g in EWA_CONCEPTS
    ]


SUBJECTS = {
    "ewa_weights": (ewa_weights_cases, EWA_WEIGHTS_PROVIDERS),
    "ewa_merge": (ewa_merge_cases, EWA_MERGE_PROVIDERS),
}

if __name__ == "__main__":
    sys.exit(common.kernel_main(__doc__, SUBJECTS))
