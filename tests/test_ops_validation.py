"""Bad inputs at the public boundary raise ValueError/TypeError naming the argument."""

import inputs
import pytest
import torch

from lifelong_engine import ops


def _replace(args, **changes):
    names = {
        "lora": ["c", "w_k", "w_v", "a_k", "b_k", "a_v", "b_v", "ids", "weights", "scale"],
        "regional": ["q", "k", "v", "region_ids", "kv_len", "scale"],
        "ewa": ["prompt", "concepts", "prompt_mask"],
        "merge": ["psi", "a", "b", "scale"],
    }
    kind = changes.pop("_kind")
    full = dict(zip(names[kind], args))
    full.update(changes)
    return full


def lora(**changes):
    return ops.lora_kv_projection, _replace(inputs.lora_kv(N=3, S=2), _kind="lora", **changes)


def regional(**changes):
    return ops.regional_cross_attention, _replace(inputs.regional(P=3, T=5), _kind="regional", **changes)


def ewa(**changes):
    return ops.ewa_weights, _replace(inputs.ewa(), _kind="ewa", **changes)


def merge(**changes):
    return ops.ewa_merge, _replace(inputs.merge(), _kind="merge", **changes)


f64 = dict(dtype=torch.float64)
BAD = {
    # lora_kv_projection: c (2, 5, 7); w (6, 7); a (3, 2, 7); b (3, 6, 2); ids/weights (2, 2)
    "lora c rank": (lambda: lora(c=torch.randn(5, 7, **f64)), ValueError, "c must be 3-D"),
    "lora c int": (lambda: lora(c=torch.ones(2, 5, 7, dtype=torch.int64)), TypeError, "c must be a floating"),
    "lora w_k width": (lambda: lora(w_k=torch.randn(6, 8, **f64)), ValueError, "w_k has shape (6, 8)"),
    "lora w_v shape": (lambda: lora(w_v=torch.randn(4, 7, **f64)), ValueError, "w_v has shape (4, 7)"),
    "lora a_k width": (lambda: lora(a_k=torch.randn(3, 2, 9, **f64)), ValueError, "a_k has shape (3, 2, 9)"),
    "lora b_k count": (lambda: lora(b_k=torch.randn(2, 6, 2, **f64)), ValueError, "b_k has shape (2, 6, 2)"),
    "lora b_k rank": (lambda: lora(b_k=torch.randn(3, 6, 4, **f64)), ValueError, "r, the rank of a_k"),
    "lora b_k dout": (lambda: lora(b_k=torch.randn(3, 5, 2, **f64)), ValueError, "Dout"),
    "lora a_v shape": (lambda: lora(a_v=torch.randn(3, 1, 7, **f64)), ValueError, "a_v has shape"),
    "lora b_v shape": (lambda: lora(b_v=torch.randn(3, 6, 1, **f64)), ValueError, "b_v has shape"),
    "lora dtype mix": (lambda: lora(a_k=torch.randn(3, 2, 7)), TypeError, "a_k has dtype torch.float32"),
    "lora ids float": (lambda: lora(ids=torch.zeros(2, 2)), TypeError, "ids must be an integer"),
    "lora ids batch": (lambda: lora(ids=torch.zeros(3, 2, dtype=torch.int64)), ValueError, "ids has shape (3, 2)"),
    "lora ids >= N": (lambda: lora(ids=torch.tensor([[0, 3], [1, 2]])), ValueError, "ids has values >= N = 3"),
    "lora ids < -1": (lambda: lora(ids=torch.tensor([[0, -2], [1, 2]])), ValueError, "ids has values < -1"),
    "lora weights slots": (lambda: lora(weights=torch.ones(2, 3, **f64)), ValueError, "weights has shape (2, 3)"),
    "lora weights int": (lambda: lora(weights=torch.ones(2, 2, dtype=torch.int32)), TypeError, "weights must be"),
    "lora scale nan": (lambda: lora(scale=float("nan")), ValueError, "scale must be a finite"),
    "lora device": (
        lambda: lora(w_k=torch.randn(6, 7, dtype=torch.float64, device="meta")),
        ValueError,
        "w_k is on meta",
    ),
    # regional_cross_attention: q (2, 2, 9, 8); k, v (2, 3, 2, 5, 8); region_ids (2, 9); kv_len (2, 3)
    "reg q rank": (lambda: regional(q=torch.randn(2, 9, 8, **f64)), ValueError, "q must be 4-D"),
    "reg k heads": (lambda: regional(k=torch.randn(2, 3, 4, 5, 8, **f64)), ValueError, "k has shape (2, 3, 4, 5, 8)"),
    "reg k dim": (lambda: regional(k=torch.randn(2, 3, 2, 5, 6, **f64)), ValueError, "d, the head dim of q"),
    "reg v shape": (lambda: regional(v=torch.randn(2, 3, 2, 4, 8, **f64)), ValueError, "v has shape (2, 3, 2, 4, 8)"),
    "reg v dtype": (lambda: regional(v=torch.randn(2, 3, 2, 5, 8)), TypeError, "v has dtype torch.float32"),
    "reg ids shape": (
        lambda: regional(region_ids=torch.zeros(2, 8, dtype=torch.int64)),
        ValueError,
        "region_ids has shape",
    ),
    "reg ids >= P": (
        lambda: regional(region_ids=torch.full((2, 9), 3)),
        ValueError,
        "region_ids has values in [3, 3]",
    ),
    "reg ids < 0": (lambda: regional(region_ids=torch.full((2, 9), -1)), ValueError, "region_ids has values"),
    "reg ids bool": (
        lambda: regional(region_ids=torch.zeros(2, 9, dtype=torch.bool)),
        TypeError,
        "region_ids must be an integer",
    ),
    "reg kv_len 0": (
        lambda: regional(kv_len=torch.tensor([[1, 0, 2], [1, 1, 1]])),
        ValueError,
        "kv_len has values in [0, 2]",
    ),
    "reg kv_len > T": (
        lambda: regional(kv_len=torch.tensor([[1, 6, 2], [1, 1, 1]])),
        ValueError,
        "expected key counts in [1, 5]",
    ),
    "reg kv_len shape": (
        lambda: regional(kv_len=torch.ones(2, 2, dtype=torch.int64)),
        ValueError,
        "kv_len has shape (2, 2)",
    ),
    "reg scale inf": (lambda: regional(scale=float("inf")), ValueError, "scale must be a finite"),
    # ewa_weights: prompt (2, 3, 6, 5); concepts (3, 4, 5); prompt_mask (2, 6)
    "ewa prompt rank": (lambda: ewa(prompt=torch.randn(3, 6, 5, **f64)), ValueError, "prompt must be 4-D"),
    "ewa layers": (lambda: ewa(concepts=torch.randn(2, 4, 5, **f64)), ValueError, "concepts has 2 layers"),
    "ewa width": (lambda: ewa(concepts=torch.randn(3, 4, 6, **f64)), ValueError, "D, the embedding width of prompt"),
    "ewa mask dtype": (lambda: ewa(prompt_mask=torch.ones(2, 6)), TypeError, "prompt_mask must be a bool"),
    "ewa mask shape": (
        lambda: ewa(prompt_mask=torch.ones(2, 5, dtype=torch.bool)),
        ValueError,
        "prompt_mask has shape",
    ),
    "ewa mask empty": (
        lambda: ewa(prompt_mask=torch.tensor([[True] * 6, [False] * 6])),
        ValueError,
        "prompt_mask rows [1] select no token",
    ),
    "ewa norm": (lambda: ewa(norm="l2"), ValueError, "norm='l2'"),
    "ewa power": (lambda: ewa(power=0.0), ValueError, "power must be a finite number > 0"),
    # ewa_merge: psi (2, 4); a (4, 3, 7); b (4, 5, 3)
    "merge psi rank": (lambda: merge(psi=torch.rand(4, **f64)), ValueError, "psi must be 2-D"),
    "merge a count": (lambda: merge(a=torch.randn(3, 3, 7, **f64)), ValueError, "a has shape (3, 3, 7)"),
    "merge b rank": (lambda: merge(b=torch.randn(4, 5, 2, **f64)), ValueError, "r, the rank of a"),
    "merge dtype": (lambda: merge(b=torch.randn(4, 5, 3)), TypeError, "b has dtype torch.float32"),
    "merge psi nan": (
        lambda: merge(psi=torch.tensor([[1.0, float("nan"), 0, 0]] * 2, **f64)),
        ValueError,
        "psi contains non-finite",
    ),
    "merge psi inf": (
        lambda: merge(psi=torch.tensor([[1.0, float("inf"), 0, 0]] * 2, **f64)),
        ValueError,
        "psi contains non-finite",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_argument(case):
    make, exc, message = BAD[case]
    op, kwargs = make()
    with pytest.raises(exc) as info:
        op(**kwargs)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("case", ["lora b_k rank", "reg k heads", "ewa layers", "merge b rank"])
def test_bad_shapes_rejected_under_fake_tensors(case):
    """Shape checks also run in the fake implementations, so torch.compile reports them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    make, exc, message = BAD[case]
    op, kwargs = make()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            op(**fake)
