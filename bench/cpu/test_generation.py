"""Generation on CPU, TinyWorld (the shipped weights, 32 px, 10 DDIM steps, guidance 5, one image):
the engine's LifelongPipeline against the plain diffusers pipeline (0 concepts) and against diffusers
with the same 10 concepts loaded as peft adapters, all active (``set_adapters``, weight 1) plus their
textual-inversion tokens. Group ``generation-tinyworld``; each provider on its own copy of the model."""

import tempfile
from pathlib import Path

import pytest
import serve  # bench/serve.py: TinyWorld build, random concepts, peft loading
import torch
from conftest import BENCH  # noqa: F401  (puts bench/ on sys.path)

from lifelong_engine import LifelongPipeline

STEPS, GUIDANCE, N_CONCEPTS = 10, 5.0, 10
PROMPTS = {0: "a photo of a red object", N_CONCEPTS: "a photo of a <c0> object and a <c1> object"}


def _concepts(pipe):
    width = pipe.text_encoder.config.hidden_size
    return [serve.random_concept(pipe.unet, width, f"c{i}", seed=i) for i in range(N_CONCEPTS)]


def _generator():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize(
    "provider", ["diffusers-0", "engine-0", f"engine-{N_CONCEPTS}", f"diffusers+peft-{N_CONCEPTS}"]
)
def test_generation(benchmark, provider):
    name, concepts = provider.rsplit("-", 1)
    concepts = int(concepts)
    pipe, side = serve.build("tinyworld", torch.device("cpu"), torch.float32)
    prompt = PROMPTS[concepts]
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=side, width=side)
    with tempfile.TemporaryDirectory() as tmp:
        if name == "engine":
            lp = LifelongPipeline.from_pipe(pipe)
            for c in _concepts(pipe)[:concepts]:
                lp.add_concept(c)

            def call():
                return lp(prompt, generator=_generator(), **kwargs).images
        else:
            if concepts:
                serve.load_peft(pipe, _concepts(pipe), Path(tmp))
                pipe.set_adapters([f"c{i}" for i in range(concepts)], [1.0] * concepts)

            def call():
                return pipe(prompt, generator=_generator(), **kwargs).images

        call()  # warm-up
        benchmark.group = "generation-tinyworld"
        benchmark.extra_info.update(steps=STEPS, guidance=GUIDANCE, concepts=concepts, side=side)
        benchmark.pedantic(call, rounds=11, iterations=1)
