"""The strategy interface of :class:`~lifelong_engine.training.ContinualTrainer`'s methods.

A method is one file in this package: a :class:`MethodConfig` subclass (its hyperparameters)
and a :class:`Method` subclass that overrides the hooks it needs. The trainer owns the loop,
the data, the checkpoints, resume and the bad-step policy, and calls the hooks in this order
for every task::

    trainable()            the parameters the task trains (besides the token rows)
    init_task()            per-task setup (prior images, replay memory, a teacher copy, ...)
    loop: regulariser()    added to the diffusion loss of every step
          after_step()     after each successful optimizer step
    adapter_factors()      the learned (a, b) of each adapted projection, for the ConceptAdapter
    finish()               bookkeeping that outlives the task; may adjust the adapter

State that outlives a task goes through :meth:`Method.state_dict` / :meth:`Method.load_state_dict`
(saved next to the checkpoints after every task) and, when it also changes within a task,
into every checkpoint (:meth:`Method.checkpoint_state`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from ...concepts import ConceptAdapter
from ...pool import AdapterPool

if TYPE_CHECKING:
    from ..trainer import ContinualTrainer, Task

__all__ = ["MethodConfig", "Method", "TaskState", "Batch", "KV"]

KV = ("to_k", "to_v")


@dataclasses.dataclass
class MethodConfig:
    """Hyperparameters of a method; each method subclasses it (no fields here)."""


@dataclasses.dataclass
class TaskState:
    """What one task trains and carries: params (name → trainable tensor, ``tokens`` included),
    the optimizer, the losses so far, the past concepts (frozen), the frozen pool the forward adds
    (``frozen``/``frozen_names``: methods that sum past concepts in the forward) and the previous
    model's copy of the shared LoRA (``teacher``: distillation methods)."""

    params: dict[str, Tensor]
    optimizer: torch.optim.Optimizer
    past: list[ConceptAdapter]
    losses: list[float] = dataclasses.field(default_factory=list)
    frozen: AdapterPool | None = None
    frozen_names: list[str] = dataclasses.field(default_factory=list)
    teacher: dict[str, Tensor] | None = None


def default_caption(token: str, class_word: str | None) -> str:
    """The caption of a concept's images when none is given: "a photo of a <token> <class>"."""
    return f"a photo of a {token} {class_word or ''}".strip()


def training_captions(concept: ConceptAdapter) -> list[str]:
    """The distinct captions ``concept`` was trained with (``metadata["captions"]``, written by the
    trainer), for methods that rehearse a past concept; a concept learned without that record gets
    :func:`default_caption`."""
    if "captions" not in concept.metadata:
        return [default_caption(concept.token, concept.class_word)]
    try:
        captions = json.loads(concept.metadata["captions"])
    except json.JSONDecodeError:
        captions = None
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c for c in captions):
        raise ValueError(
            f"concept {concept.name!r}: metadata 'captions' must be a JSON list of its training captions, "
            f"got {concept.metadata['captions'][:80]!r}"
        )
    return captions


def rehearsal_captions(concept: ConceptAdapter, n: int) -> list[str]:
    """``n`` captions to generate a past concept's rehearsal images with: its training captions in turn."""
    known = training_captions(concept)
    return [known[i % len(known)] for i in range(n)]


@dataclasses.dataclass
class Batch:
    """One training step's inputs and the model's prediction (the regulariser may reuse them)."""

    captions: list[str]
    noisy: Tensor
    t: Tensor
    target: Tensor
    pred: Tensor


class Method:
    """Base strategy: a fresh rank-r LoRA on K and V per task, no regulariser (LoRA-M's behaviour).

    Class attributes say what the trainer needs to know without naming methods:
    ``name``; ``Config``; ``projections`` the LoRA adapts; ``shares_lora`` (one LoRA continues
    across tasks: earlier concepts keep only their tokens in the pipeline); ``layerwise_tokens``
    (one token row per attn2 layer); ``sums_past`` (past concepts are added in the training
    forward); ``keeps_teacher`` (a frozen copy of the previous shared LoRA is kept as a teacher).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    projections: ClassVar[tuple[str, ...]] = KV
    shares_lora: ClassVar[bool] = False
    layerwise_tokens: ClassVar[bool] = False
    sums_past: ClassVar[bool] = False
    keeps_teacher: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, trainer: ContinualTrainer):
        self.config, self.trainer = config, trainer

    # ------------------------------------------------------------------ hooks

    def trainable(self, task: Task, past: list[ConceptAdapter], gen: torch.Generator) -> dict[str, Tensor]:
        """The task's trainable tensors (without the token rows): ``{layer}.{proj}.lora_A.weight`` (r, Din)
        and ``.lora_B.weight`` (Dout, r) per adapted projection. Fresh ones use peft's initialisation
        (kaiming_uniform(a=√5) on A, zeros on B); shared-LoRA methods continue the latest concept's."""
        tr = self.trainer
        dev = tr.pipeline.device
        source = next((c for c in reversed(past) if c.method == self.name), None) if self.shares_lora else None
        params = {}
        for layer in tr.pipeline.layers:
            for proj in self.projections:
                din, dout = tr.widths[layer, proj]
                if source is not None:
                    a, b = source.factors(layer, proj)
                    params[f"{layer}.{proj}.lora_A.weight"] = a.detach().float().clone()
                    params[f"{layer}.{proj}.lora_B.weight"] = b.detach().float().clone()
                else:
                    bound = 1 / math.sqrt(din)
                    a = (torch.rand((tr.rank, din), generator=gen) * 2 - 1).mul(bound).to(dev)
                    params[f"{layer}.{proj}.lora_A.weight"] = a
                    params[f"{layer}.{proj}.lora_B.weight"] = torch.zeros(dout, tr.rank, device=dev)
        return params

    def init_task(self, task: Task, state: TaskState, gen: torch.Generator) -> None:
        """Per-task setup after the parameters exist (and before a checkpoint is loaded)."""

    def regulariser(self, task: Task, state: TaskState, batch: Batch, gen: torch.Generator) -> Tensor | None:
        """A term added to the step's diffusion loss (None: nothing)."""
        return None

    def after_step(self, task: Task, state: TaskState, step: int) -> None:
        """Called after optimizer step ``step`` (1-based) succeeded."""

    def forward_factors(self, params: dict[str, Tensor], layer: str, proj: str) -> tuple[Tensor, Tensor]:
        """(a (r, Din), b (Dout, r)) of the trained adapter in the training forward."""
        return params[f"{layer}.{proj}.lora_A.weight"], params[f"{layer}.{proj}.lora_B.weight"]

    def adapter_factors(self, params: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
        """The learned LoRA as ``(lora, rank)`` for the ConceptAdapter (keys as :meth:`trainable`)."""
        lora = {}
        for layer in self.trainer.pipeline.layers:
            for proj in self.projections:
                a, b = self.forward_factors(params, layer, proj)
                lora[f"{layer}.{proj}.lora_A.weight"] = a.detach().cpu().clone()
                lora[f"{layer}.{proj}.lora_B.weight"] = b.detach().cpu().clone()
        return lora, self.trainer.rank

    def finish(self, task: Task, state: TaskState, adapter: ConceptAdapter) -> ConceptAdapter:
        """After the task: update state that outlives it; return the adapter to publish."""
        return adapter

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """State that outlives a task (tensors, dicts and lists of them; loaded with weights_only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def checkpoint_state(self) -> dict | None:
        """State that changes within a task and must be in every checkpoint (None: none)."""
        return None

    def load_checkpoint_state(self, state: dict) -> None:
        pass
