"""TinyWorld: the engine's embedded default world, for the demo, the tests and the quality benchmark.

:mod:`~lifelong_engine.tinyworld.world` renders 32×32 scenes of simple objects with captions and
holds the personal concepts the base model never sees; :mod:`~lifelong_engine.tinyworld.tokenizer`
builds the CLIP tokenizer of the world's vocabulary in code. Importing this package imports
neither diffusers nor transformers. The base model lives in ``tinyworld.model``
(``load_tinyworld_pipeline``), its training script in ``tinyworld.train_base`` and the
evaluator in ``tinyworld.evaluator``; import those modules directly.
"""

from .tokenizer import BOS_TOKEN, EOS_TOKEN, MODEL_MAX_LENGTH, build_tokenizer, build_vocab, write_tokenizer_files
from .world import (
    BACKGROUNDS,
    COLOURS,
    CONCEPT_TRAIN_POSITIONS,
    CONCEPTS,
    OBJECT_COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    Concept,
    ContextPrompt,
    Identity,
    Layout,
    ObjectSpec,
    Region,
    Sample,
    Scene,
    caption,
    concept_of,
    context_prompts,
    generic_dataset,
    get_concept,
    object_box,
    object_coverage,
    render,
    render_array,
    render_batch,
    sample_scene,
    sample_scenes,
    two_concept_layout,
    vocabulary,
)

__all__ = [
    "BACKGROUNDS",
    "BOS_TOKEN",
    "COLOURS",
    "CONCEPT_TRAIN_POSITIONS",
    "CONCEPTS",
    "EOS_TOKEN",
    "MODEL_MAX_LENGTH",
    "OBJECT_COLOURS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "TEXTURES",
    "Concept",
    "ContextPrompt",
    "Identity",
    "Layout",
    "ObjectSpec",
    "Region",
    "Sample",
    "Scene",
    "build_tokenizer",
    "build_vocab",
    "caption",
    "concept_of",
    "context_prompts",
    "generic_dataset",
    "get_concept",
    "object_box",
    "object_coverage",
    "render",
    "render_array",
    "render_batch",
    "sample_scene",
    "sample_scenes",
    "two_concept_layout",
    "vocabulary",
    "write_tokenizer_files",
]
