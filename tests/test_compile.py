"""torch.compile and the fused ops (issue 17, item 7): every op's fake implementation gives the real op's
shapes and strides on non-contiguous inputs (torch.library.opcheck), and a UNet with the engine's processors
compiles (CPU inductor) and gives eager's output."""

import inspect

import inputs
import numpy as np
import pytest
import torch
from concept_factory import concept_for_unet
from test_ops_grouped_kv import grouped_args
from tiny_pipes import tiny_sd_pipeline

from lifelong_engine import backends, ops
from lifelong_engine.errors import BackendUnavailableError
from lifelong_engine.pipeline import LifelongPipeline


def strided(x, dtype=None):
    """x with the same values and other strides (its last two dims stored transposed), floats cast to dtype
    when given; leaves stay leaves."""
    if not isinstance(x, torch.Tensor):
        return x
    y = x.detach()
    if dtype is not None and y.is_floating_point():
        y = y.to(dtype)
    if y.dim() >= 2:
        y = y.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not y.is_contiguous()
    return y.requires_grad_(x.requires_grad)


def _all(args, dtype=None):
    return tuple([strided(t, dtype) for t in a] if isinstance(a, list) else strided(a, dtype) for a in args)


CASES = {
    "lora_kv_projection": lambda: (inputs.lora_kv(grad=True), {}),
    "lora_term": lambda: ((lambda a: (a[0], a[3], a[4], a[7], a[8], a[9]))(inputs.lora_kv(grad=True)), {}),
    "_lora_term_trusted": lambda: ((lambda a: (a[0], a[3], a[4], a[7], a[8], a[9]))(inputs.lora_kv(grad=True)), {}),
    "regional_cross_attention": lambda: (inputs.regional(grad=True)[:5], {"scale": 0.5}),
    "_regional_cross_attention_trusted": lambda: (inputs.regional(grad=True)[:5], {}),
    "ewa_weights": lambda: (inputs.ewa(grad=True), {"power": 4.0, "norm": "l1"}),
    "ewa_weights_rows": lambda: (
        (
            torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True),
            torch.randn(3, 4, 2, 5, dtype=torch.float64, requires_grad=True),
            torch.tensor([[True, True], [True, False], [True, True], [True, False]]),
            None,
        ),
        {},
    ),  # fmt: skip
    "ewa_merge": lambda: (inputs.merge(grad=True), {}),
    "lora_kv_projection_grouped": lambda: (grouped_args(), {}),
}


BACKENDS = ops.available_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(CASES))
def test_opcheck_on_non_contiguous_inputs(op, backend):
    args, kwargs = CASES[op]()
    args = _all(args, torch.float32 if backend == "triton" else None)  # the Triton kernels take no float64
    public = op.removeprefix("_").removesuffix("_trusted")
    bound = inspect.signature(getattr(ops, public)).bind(*args, **kwargs)
    bound.apply_defaults()  # a backend checks the op's whole argument list (scale, kv_len included)
    try:
        backends.select(public, tuple(bound.arguments.values()), backend)
    except BackendUnavailableError as e:
        pytest.skip(str(e))
    with ops.use_backend(backend):
        torch.library.opcheck(getattr(torch.ops.lifelong, op).default, args, kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regional_attention_fake_has_the_real_outputs_strides(backend):
    """The reported crash: the fake returned empty_like(q), q's transposed strides, while the reference and
    triton backends return a contiguous tensor (the torch backend's SDPA returned q's layout), so code compiled
    against the fake read the output in the wrong layout. Every backend's output is contiguous now, as the fake."""
    q, k, v, region_ids, kv_len, _ = inputs.regional(dtype=torch.float32)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, N, d) stored as (B, N, H, d), as attention makes it
    with ops.use_backend(backend):
        real = ops.regional_cross_attention(q, k, v, region_ids, kv_len)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = torch.ops.lifelong.regional_cross_attention(
            *(mode.from_tensor(t) for t in (q, k, v, region_ids, kv_len))
        )
    assert fake.shape == real.shape and fake.stride() == real.stride()


def test_compiled_unet_with_the_engines_processors_matches_eager():
    """``pipe.unet.compile()`` (in place, after wrapping), CPU inductor, fullgraph,
    with a concept and regions: the images equal eager's."""
    torch._dynamo.reset()
    pipe = tiny_sd_pipeline()
    lp = LifelongPipeline.from_pipe(pipe)
    lp.add_concept(concept_for_unet(pipe.unet, "dog1", lp.text.token_width, projections=("to_k", "to_v", "to_q")))

    def run():
        kwargs = dict(regions=[("a <dog1>", (0.0, 0.0, 0.5, 1.0))], alpha=0.6, num_inference_steps=2)
        return lp("a <dog1> and a cube", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images

    eager = run()
    pipe.unet.compile(fullgraph=True)
    compiled = run()
    np.testing.assert_allclose(compiled, eager, atol=1e-5)
