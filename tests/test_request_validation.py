"""Bad generation options are refused where the request is made, with a ValueError naming the option and
what is expected, by the pipeline and the serving Engine alike (issue 13 row 7): before, ewa_top_k=0 dropped
every concept silently, guidance_scale=inf gave a black image and height=-16 a raw RuntimeError."""

import pytest
from test_serving import lp, request, store  # noqa: F401  (fixtures)

from lifelong_engine.serving import Engine

BAD_OPTIONS = {  # option → (value, what the message must contain)
    "ewa_top_k 0": ("ewa_top_k", 0, "ewa_top_k=0: expected None"),
    "ewa_top_k -1": ("ewa_top_k", -1, "ewa_top_k=-1"),
    "ewa_top_k float": ("ewa_top_k", 1.5, "ewa_top_k=1.5"),
    "guidance inf": ("guidance_scale", float("inf"), "guidance_scale=inf: expected a finite number"),
    "guidance nan": ("guidance_scale", float("nan"), "guidance_scale=nan"),
    "guidance str": ("guidance_scale", "7.5", "guidance_scale='7.5'"),
    "height negative": ("height", -16, "height=-16: expected None or a positive multiple of"),
    "height zero": ("height", 0, "height=0"),
    "width odd": ("width", 33, "width=33"),
    "steps 0": ("num_inference_steps", 0, "num_inference_steps=0: expected an integer >= 1"),
    "steps float": ("num_inference_steps", 2.5, "num_inference_steps=2.5"),
    "alpha nan": ("alpha", float("nan"), "alpha=nan: expected a number in [0, 1]"),
    "alpha 2": ("alpha", 2.0, "alpha=2.0"),
    "power 0": ("ewa_power", 0.0, "ewa_power=0.0: expected a finite number > 0"),
    "power nan": ("ewa_power", float("nan"), "ewa_power=nan"),
    "power -1": ("ewa_power", -1.0, "ewa_power=-1.0"),
    "norm": ("ewa_norm", "l3", "ewa_norm='l3': expected one of"),
    "ewa str": ("ewa", "yes", "ewa='yes'"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_the_pipeline_refuses_bad_options(lp, case):  # noqa: F811
    name, value, message = BAD_OPTIONS[case]
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        lp("a dog", **{"num_inference_steps": 2, name: value})


ENGINE_ONLY = {
    "duplicate concepts": (dict(concepts=("dog1", "dog1")), r"concepts names \['dog1'\] more than once"),
    "concepts as a string": (dict(concepts="dog1"), "concepts='dog1': expected None or a list"),
    "seed too large": (dict(seed=2**70), r"seed=1180591620717411303424: expected None or an integer"),
    "seed float": (dict(seed=1.0), "seed=1.0"),
    "empty prompt": (dict(prompt=""), "prompt='': expected a non-empty string"),
    "negative prompt int": (dict(negative_prompt=5), "negative_prompt=5: expected None or a string"),
    "guidance options dict": (dict(attention_guidance={"steps": 2}), "attention_guidance=.*: expected None or an"),
}


@pytest.mark.parametrize("case", [*BAD_OPTIONS, *ENGINE_ONLY])
def test_the_engine_refuses_bad_requests_at_submit(lp, store, case):  # noqa: F811
    if case in BAD_OPTIONS:
        name, value, message = BAD_OPTIONS[case]
        changes = {"steps" if name == "num_inference_steps" else name: value}
        message = message.replace("[", r"\[").replace("]", r"\]")
    else:
        changes, message = ENGINE_ONLY[case]
    with Engine(lp, store) as engine:
        with pytest.raises(ValueError, match=message):
            engine.submit(request(**changes))
        assert engine.submit(request(steps=1)).result(timeout=120).images  # the engine still serves


def test_the_pipeline_refuses_a_negative_prompt_that_is_not_text(lp):  # noqa: F811
    with pytest.raises(ValueError, match="negative_prompt=5: expected None, a string or a list of strings"):
        lp("a dog", negative_prompt=5, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"negative_prompt=\['x', 3\]"):
        lp(["a dog", "a cat"], negative_prompt=["x", 3], num_inference_steps=1)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_batch_rows=0), "max_batch_rows=0: expected an integer >= 1"),
        (dict(max_queue=0), "max_queue=0: expected an integer >= 1"),  # 0 would be an unbounded queue
        (dict(submit_timeout=-1.0), "submit_timeout=-1.0: expected a finite number"),
    ],
)
def test_the_engine_refuses_bad_settings(lp, store, kwargs, message):  # noqa: F811
    with pytest.raises(ValueError, match=message):
        Engine(lp, store, **kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(eta=float("nan")), r"eta=nan: expected a number in \[0, 1\]"),
        (dict(guidance_rescale=float("inf")), "guidance_rescale=inf"),
        (dict(capture_attention=["no.such.layer"]), r"capture_attention: \['no.such.layer'\] are not attn2 layer"),
        (dict(capture_attention="up_blocks"), r"capture_attention: \['up_blocks'\]"),  # a string, not a list
    ],
)
def test_the_pipeline_refuses_bad_pipeline_only_options(lp, kwargs, message):  # noqa: F811
    """These were accepted silently: a NaN eta or rescale gave NaN images, an unknown or string
    capture_attention returned no maps."""
    with pytest.raises(ValueError, match=message):
        lp("a dog", num_inference_steps=1, **kwargs)
