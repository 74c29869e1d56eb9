"""TinyWorld's tokenizer: a CLIP BPE tokenizer built in code, in which every word of the world is one token.

The vocabulary follows CLIP's layout: the 256 byte-level characters, the same with the end-of-word
mark ``</w>``, one entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>``. For each world
word the merges build it left to right (``g r``, ``gr e``, ``gre e``, ``gree n</w>``), so every
intermediate string is in the vocabulary; any other text still tokenizes, falling back to pieces
and characters. Concept tokens such as ``<tw-badge>`` are not in the base vocabulary: a concept
adds its token with ``tokenizer.add_tokens`` when it is learned.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .world import vocabulary

if TYPE_CHECKING:  # transformers is imported only when a tokenizer is built
    from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
_END = "</w>"
_WORD = re.compile(r"[a-z]+")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from the 256 byte values to printable unicode characters."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))  # printable, not space
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def _merges_of(word: str) -> list[tuple[str, str]]:
    """The merges that build ``word`` left to right; the last symbol carries ``</w>``."""
    symbols = list(word[:-1]) + [word[-1] + _END]
    return [(word[:k], symbols[k]) for k in range(1, len(word))]


def build_vocab(words: Iterable[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP BPE ``(vocab, merges)`` in which each of ``words`` (default: the world's
    :func:`~lifelong_engine.tinyworld.world.vocabulary`) encodes to exactly one token.

    BPE applies the lowest-ranked merge among a word's adjacent pairs. After a word's first merge
    the only multi-character symbol is its growing prefix, so ranking every merge with a
    multi-character left side before every character-pair merge makes the prefix win; the
    character-pair merges are then ordered so that each word's first pair outranks the other
    character pairs found inside it (a topological sort, ties broken alphabetically)."""
    words = sorted(set(vocabulary() if words is None else words))
    for word in words:
        if not _WORD.fullmatch(word):
            raise ValueError(f"tokenizer word {word!r}: expected lowercase ASCII letters only")
    multi, pairs = set(), set()
    for word in words:
        for left, right in _merges_of(word):
            (multi if len(left) > 1 else pairs).add((left, right))
    # pair p must come before every character-pair merge that occurs later in a word starting with p
    after: dict[tuple[str, str], set[tuple[str, str]]] = {p: set() for p in pairs}
    for word in words:
        merges = _merges_of(word)
        if not merges:
            continue
        symbols = list(word[:-1]) + [word[-1] + _END]
        inner = {(symbols[i], symbols[i + 1]) for i in range(1, len(symbols) - 1)} & pairs
        after[merges[0]] |= inner - {merges[0]}
    indegree = {p: 0 for p in pairs}
    for successors in after.values():
        for p in successors:
            indegree[p] += 1
    ready = sorted(p for p, d in indegree.items() if d == 0)
    ordered_pairs = []
    while ready:
        p = ready.pop(0)
        ordered_pairs.append(p)
        for q in sorted(after[p]):
            indegree[q] -= 1
            if indegree[q] == 0:
                ready.append(q)
        ready.sort()
    if len(ordered_pairs) != len(pairs):
        stuck = sorted("".join(p) for p, d in indegree.items() if d > 0)
        raise ValueError(f"tokenizer words: no merge order makes each one token (cycle among {stuck})")
    merges = sorted(multi, key=lambda m: (len(m[0]), m)) + ordered_pairs

    byte_chars = list(bytes_to_unicode().values())
    entries = byte_chars + [c + _END for c in byte_chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for entry in entries:
        vocab.setdefault(entry, len(vocab))
    return vocab, merges


def write_tokenizer_files(directory: str | Path, words: Iterable[str] | None = None) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` to ``directory``
    (created if missing); the same bytes on every call. Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def build_tokenizer(directory: str | Path | None = None) -> CLIPTokenizer:
    """A ``transformers.CLIPTokenizer`` for TinyWorld, built without downloads.

    The files go to ``directory`` (kept, so it can be saved next to a model), or to a temporary
    directory removed once loaded when ``directory`` is None. ``model_max_length`` 77, padding
    with ``<|endoftext|>``, as in Stable Diffusion."""
    from transformers import CLIPTokenizer

    if directory is not None:
        write_tokenizer_files(directory)
        return CLIPTokenizer.from_pretrained(str(directory), model_max_length=MODEL_MAX_LENGTH)
    with tempfile.TemporaryDirectory(prefix="tinyworld-tokenizer-") as tmp:
        write_tokenizer_files(tmp)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MODEL_MAX_LENGTH)
