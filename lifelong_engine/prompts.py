"""Layer-wise prompt encoding (DESIGN §2, §5).

A concept appears in a prompt by its token (``<my-dog>``), which stands for its token words,
one learned embedding row per word per ``attn2`` layer. To encode a prompt for layer l the
token's positions get layer l's rows; all L variants of all prompts go through the text
encoder(s) as one batch. Prompts without concept rows are encoded once and shared by every
layer. The rows are substituted with a forward hook on the encoder's input embedding while it
runs, so neither the tokenizer nor the text encoder is modified; with no concept in a prompt the
token ids and embeddings are exactly diffusers' own.

SD-1.x/2.x use the last hidden state of one CLIP text encoder; SDXL concatenates the penultimate
hidden states of its two encoders and takes the pooled embedding from the second. A concept's
token rows for a model with several encoders are the concatenation of each encoder's rows along
the feature axis, in encoder order (768 + 1280 = 2048 for SDXL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

import torch
from diffusers.utils import logging
from torch import Tensor

from .concepts import ConceptAdapter

__all__ = ["EncodedPrompts", "PromptEncoder", "TOKEN_PATTERN"]

# Warnings go through diffusers' logger (``diffusers.utils.logging.set_verbosity_error()`` silences them).
logger = logging.get_logger("diffusers.lifelong_engine")

# What looks like a concept token in a prompt: <name>, no spaces (CLIP's own <|...|> excluded).
TOKEN_PATTERN = re.compile(r"<[^<>|\s]+>")
_CHUNK_ROWS = 64  # text-encoder rows per forward pass


@dataclasses.dataclass
class EncodedPrompts:
    """per_layer: (n, L, T, D) ĉ^l of each prompt; pooled: (n, Dp) or None (SDXL's text_embeds);
    word_mask: (n, T) the prompt's own tokens (no BOS, EOS or padding); eos: (n,) EOS positions;
    concept_mask: (n, T) positions holding concept token rows; positions[i]: the token positions of each
    concept named in prompt i (one list per concept, in order of first appearance; first tokenizer);
    shared: (n, T, D) when every layer reads the same text (no layer-wise token rows), per_layer then being
    its expanded view (the text side runs it once for all layers), else None."""

    per_layer: Tensor
    pooled: Tensor | None
    word_mask: Tensor
    eos: Tensor
    concept_mask: Tensor
    positions: list[list[list[int]]] = dataclasses.field(default_factory=list)
    shared: Tensor | None = None

    @property
    def text(self) -> Tensor:
        """What :meth:`LifelongPipeline.text_kv` reads: :attr:`shared` when there is one, else per_layer."""
        return self.per_layer if self.shared is None else self.shared

    @property
    def ewa_mask(self) -> Tensor:
        """Tokens EWA takes the max over: the prompt's words and its EOS (never empty)."""
        pos = torch.arange(self.word_mask.shape[1], device=self.word_mask.device)
        return self.word_mask | (pos[None] == self.eos[:, None])


@dataclasses.dataclass
class _Tokenized:
    ids: list[int]
    concept_rows: list[tuple[int, ConceptAdapter, int]]  # (position, concept, word index)
    eos: int
    removed: str = ""  # the text truncation removed


class PromptEncoder:
    """Encodes prompts layer-wise with the tokenizers and text encoders of a diffusers pipeline.

    hidden: "last" (SD-1.x/2.x: last hidden state) or "penultimate" (SDXL).
    """

    def __init__(self, tokenizers: list, text_encoders: list, num_layers: int, hidden: str = "last"):
        if len(tokenizers) != len(text_encoders) or not tokenizers:
            raise ValueError("PromptEncoder needs one tokenizer per text encoder")
        self.tokenizers, self.text_encoders = tokenizers, text_encoders
        self.num_layers, self.hidden = num_layers, hidden
        self.widths = [te.get_input_embeddings().embedding_dim for te in text_encoders]

    @property
    def token_width(self) -> int:
        """Width of a concept's token rows: the sum of the encoders' embedding widths."""
        return sum(self.widths)

    # ------------------------------------------------------------ tokenization

    def tokenize(self, prompt: str, concepts: dict[str, ConceptAdapter], tokenizer) -> _Tokenized:
        """Token ids padded to the model length, truncating as diffusers does (``removed``: what was cut).

        Concept tokens with learned rows become one placeholder position per word; tokens of concepts
        without rows stay text. Raises ValueError for a ``<token>`` no concept owns.
        """
        pieces: list[str | ConceptAdapter] = []
        last = 0
        for match in TOKEN_PATTERN.finditer(prompt):
            concept = concepts.get(match.group())
            if concept is None:
                known = ", ".join(sorted(concepts)) or "none"
                raise ValueError(f"unknown concept token {match.group()!r} in prompt {prompt!r} (known: {known})")
            if concept.token_embeddings is not None:
                pieces += [prompt[last : match.start()], concept]
                last = match.end()
        pieces.append(prompt[last:])

        ids: list[int] = []
        rows: list[tuple[int, ConceptAdapter, int]] = []
        placeholder = _placeholder_id(tokenizer)
        for piece in pieces:
            if isinstance(piece, str):
                ids += tokenizer(piece, add_special_tokens=False).input_ids if piece.strip() else []
            else:
                rows += [(len(ids) + 1 + w, piece, w) for w in range(len(piece.words))]
                ids += [placeholder] * len(piece.words)
        limit = tokenizer.model_max_length - 2
        removed = ""
        if len(ids) > limit:
            removed = tokenizer.decode(ids[limit:])
            ids = ids[:limit]
            rows = [r for r in rows if r[0] <= limit]
        ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        eos = len(ids) - 1
        ids += [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(ids))
        return _Tokenized(ids, rows, eos, removed)

    # ---------------------------------------------------------------- encoding

    def encode(
        self,
        prompts: list[str],
        concepts: dict[str, ConceptAdapter],
        prompts_2: list[str] | None = None,
        clip_skip: int | None = None,
    ) -> EncodedPrompts:
        """Encode ``prompts`` for every layer; ``concepts`` maps token → concept. ``prompts_2``: what the
        second and later encoders read (SDXL's ``prompt_2``; default ``prompts``); ``clip_skip``: layers of
        the text encoder skipped as diffusers' ``clip_skip`` does (SD: the final layer norm applied to
        ``hidden_states[-(clip_skip + 1)]``; SDXL: ``hidden_states[-(clip_skip + 2)]``)."""
        device = self.text_encoders[0].device
        if prompts_2 is not None and len(prompts_2) != len(prompts):
            raise ValueError(f"prompts_2 has {len(prompts_2)} entries, prompts {len(prompts)}")
        per_encoder = [
            [self.tokenize(p, concepts, tok) for p in (prompts if e == 0 or prompts_2 is None else prompts_2)]
            for e, tok in enumerate(self.tokenizers)
        ]
        first = per_encoder[0]
        for p, prompt in enumerate(prompts):  # one warning per over-long prompt, whatever the encoders
            if any(tokens[p].removed for tokens in per_encoder):
                removed = next(tokens[p].removed for tokens in per_encoder if tokens[p].removed)
                logger.warning(
                    f"prompt truncated to {self.tokenizers[0].model_max_length} tokens; removed: {removed!r} "
                    f"(prompt {prompt[:40]!r}...)"
                )
        # Prompts with layer-wise rows (in any encoder's text) get one encoder row per layer, the others one row.
        variants = [
            self.num_layers
            if any(c.token_embeddings.shape[0] > 1 for tokens in per_encoder for _, c, _ in tokens[p].concept_rows)
            else 1
            for p in range(len(prompts))
        ]
        row_of = torch.tensor([0, *variants]).cumsum(0).tolist()  # first encoder row of each prompt

        hidden, pooled = [], None
        offset = 0
        for e, (tokens, encoder) in enumerate(zip(per_encoder, self.text_encoders)):
            ids, subs = [], []
            for p, t in enumerate(tokens):
                for v in range(variants[p]):
                    subs += [
                        (len(ids), pos, c.token_embeddings[min(v, c.token_embeddings.shape[0] - 1), w])
                        for pos, c, w in t.concept_rows
                    ]
                    ids.append(t.ids)
            out_h, out_p = self._run_encoder(
                encoder, torch.tensor(ids, device=device), subs, offset, self.widths[e], clip_skip
            )
            hidden.append(out_h)
            if out_p is not None and pooled is None:
                pooled = out_p[row_of[:-1]]  # the layer-0 variant of each prompt
            offset += self.widths[e]
        rows = torch.cat(hidden, dim=-1)  # (sum(variants), T, D)

        shared = None
        if all(v == 1 for v in variants):  # one row per prompt, the same for every layer: a view, no copy
            shared = rows
            per_layer = rows[:, None].expand(-1, self.num_layers, -1, -1)
        else:
            index = [[row_of[p] + min(v, n - 1) for v in range(self.num_layers)] for p, n in enumerate(variants)]
            per_layer = rows[torch.tensor(index, device=device)]  # (n, L, T, D)
        T = rows.shape[1]
        eos = torch.tensor([t.eos for t in first], device=device)
        pos = torch.arange(T, device=device)
        word_mask = (pos[None] > 0) & (pos[None] < eos[:, None])
        concept_mask = torch.zeros(len(prompts), T, dtype=torch.bool, device=device)
        positions = []
        for p, t in enumerate(first):
            by_concept: dict[str, list[int]] = {}
            for position, concept, _ in t.concept_rows:
                by_concept.setdefault(concept.token, []).append(position)
            positions.append(list(by_concept.values()))
            concept_mask[p, [position for position, _, _ in t.concept_rows]] = True
        return EncodedPrompts(per_layer, pooled, word_mask, eos, concept_mask, positions, shared)

    def _run_encoder(
        self, encoder, ids: Tensor, subs: list, offset: int, width: int, clip_skip: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        hidden, pooled = [], []
        for start in range(0, ids.shape[0], _CHUNK_ROWS):
            end = start + _CHUNK_ROWS
            chunk = [(r - start, pos, row[offset : offset + width]) for r, pos, row in subs if start <= r < end]
            with _substituted(encoder.get_input_embeddings(), chunk):
                out = encoder(ids[start:end], output_hidden_states=True)
            if self.hidden == "penultimate":
                hidden.append(out.hidden_states[-((clip_skip or 0) + 2)])
            elif clip_skip:
                norm = getattr(encoder, "text_model", encoder).final_layer_norm  # transformers < 5 nests it
                hidden.append(norm(out.hidden_states[-(clip_skip + 1)]))
            else:
                hidden.append(out[0])
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds
                pooled.append(out[0])
        return torch.cat(hidden), torch.cat(pooled) if pooled else None

    def concept_embedding(self, concept: ConceptAdapter) -> Tensor:
        """ê^l of a concept without stored ones: its token encoded alone per layer, averaged over
        the token's positions (L, D)."""
        enc = self.encode([concept.token], {concept.token: concept})
        mask = enc.concept_mask if enc.concept_mask.any() else enc.word_mask
        return (enc.per_layer[0] * mask[0, None, :, None]).sum(1) / mask[0].sum()

    def concept_rows(self, concepts: list[ConceptAdapter]) -> tuple[Tensor, Tensor]:
        """The released CIDM code's concept rows (its EWA's ê): ONE prompt made of every concept's token in
        order (``"<c1> <c2> …"``) encoded per layer with that layer's token rows, so later concepts are
        encoded in the context of earlier ones (CLIP is causal); concept g's rows are the outputs at its
        word positions. Returns (rows (L, G, W, D), present (G, W) bool), W the most words of a concept.
        A library with more words than one prompt holds (model length − 2) is encoded in consecutive
        prompts of whole concepts (the released code has one prompt and would truncate)."""
        if not concepts:
            raise ValueError("concept_rows: no concepts")
        limit = self.tokenizers[0].model_max_length - 2
        chunks, chunk, used = [], [], 0
        for c in concepts:
            n = len(c.words) if c.token_embeddings is not None else 0
            if chunk and used + n > limit:
                chunks.append(chunk)
                chunk, used = [], 0
            chunk.append(c)
            used += n
        chunks.append(chunk)
        width = max((len(c.words) for c in concepts), default=1)
        per_concept = []
        for chunk in chunks:
            tokens = {c.token: c for c in chunk}
            prompt = " ".join(c.token for c in chunk)
            enc = self.encode([prompt], tokens)
            positions: dict[str, list[int]] = {}
            for pos, c, _ in self.tokenize(prompt, tokens, self.tokenizers[0]).concept_rows:
                positions.setdefault(c.name, []).append(pos)
            for c in chunk:
                pos = positions.get(c.name) or [int(enc.eos[0])]  # no token rows: the EOS output stands in
                per_concept.append(enc.per_layer[0][:, pos])  # (L, w_g, D)
        L, D = per_concept[0].shape[0], per_concept[0].shape[-1]
        rows = per_concept[0].new_zeros(L, len(concepts), width, D)
        present = torch.zeros(len(concepts), width, dtype=torch.bool, device=rows.device)
        for g, r in enumerate(per_concept):
            rows[:, g, : r.shape[1]] = r
            present[g, : r.shape[1]] = True
        return rows, present


def _placeholder_id(tokenizer) -> int:
    """A real, non-special id that stands in for a concept row (the row replaces its embedding).
    Never EOS, so CLIP's pooling (argmax of ids, or first EOS) is unaffected."""
    special = set(tokenizer.all_special_ids)
    return next(i for i in range(len(tokenizer)) if i not in special)


@contextlib.contextmanager
def _substituted(embedding: torch.nn.Module, subs: list[tuple[int, int, Tensor]]):
    """While active, ``embedding``'s output at (row, position) is replaced by the given vectors."""
    if not subs:
        yield
        return
    rows = torch.tensor([s[0] for s in subs])
    positions = torch.tensor([s[1] for s in subs])
    values = torch.stack([s[2] for s in subs])

    def hook(module, args, output):
        output = output.clone()
        output[rows.to(output.device), positions.to(output.device)] = values.to(output.device, output.dtype)
        return output

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
