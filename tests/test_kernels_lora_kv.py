"""Triton lora_kv kernels (forward, backward, grouped all-layer forward) against the reference.

Runs on CUDA, or on CPU under Triton's interpreter (TRITON_INTERPRET=1 set before Python
starts): tiny odd shapes there, the SD-1.5 shapes and bf16 only on a GPU.
"""

import importlib

import inputs
import pytest
import torch
from kernel_testing import CAN_RUN, DEVICE, assert_flash_close
from torch.utils._python_dispatch import TorchDispatchMode

from lifelong_engine import ops, reference

if not CAN_RUN:
    pytest.skip("Triton kernels need CUDA, or TRITON_INTERPRET=1 set before Python starts", allow_module_level=True)
lora_kv = importlib.import_module("lifelong_engine.kernels.lora_kv")

# fp32: kernel vs a float64 reference of the same inputs (IEEE fp32 products: PyTorch's default
# disallows TF32). fp16: FlashAttention's rule against the fp32 reference of the fp16-rounded
# inputs: error ≤ 2 × (error of PyTorch doing it in fp16) + ATOL_FLASH (one fp16 rounding of
# an O(1) output is already ~1e-3).
TOL32 = dict(atol=1e-4, rtol=1e-4)
ATOL_FLASH = {torch.float16: 1e-3, torch.bfloat16: 1e-2}

# (shape of inputs.lora_kv, ids or None for its random ids)
SHAPES = {
    # T = 77 (two T blocks), non-power-of-two dims, a repeated adapter and an empty slot in sample 0
    "T77": (dict(B=2, T=77, Din=40, Dout=24, N=5, r=3, S=3), [[1, 1, -1], [4, 0, 2]]),
    "tiny": (dict(B=1, T=1, Din=3, Dout=5, N=2, r=1, S=1), [[1]]),
    # S·r = 39 > 32 slot-ranks per chunk (two chunks), several Din and Dout blocks
    "chunks": (dict(B=2, T=5, Din=70, Dout=65, N=4, r=13, S=3), [[3, -1, 0], [2, 2, 2]]),
}
DTYPES = [torch.float32, torch.float16]


def make_args(shape, ids=None, dtype=torch.float32):
    args = list(inputs.lora_kv(**shape, dtype=dtype, device=DEVICE))
    if ids is not None:
        args[7] = torch.tensor(ids, device=DEVICE)
    return tuple(args)


def upcast(args, dtype=torch.float64):
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def check(got, args, fn, ref_args_of_dtype):
    """Compare kernel outputs ``got`` with ``fn`` of the reference at the inputs' precision."""
    dtype = args[0].dtype
    if dtype == torch.float32:
        want = fn(*upcast(args))
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, **TOL32)
    else:
        ref32 = fn(*upcast(args, torch.float32))
        same = fn(*ref_args_of_dtype)
        for g, w, s in zip(got, ref32, same):
            assert g.dtype == s.dtype
            if g.numel():
                assert_flash_close(g, w.float(), s, atol=ATOL_FLASH[dtype])


# ------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SHAPES)
def test_forward_matches_reference(name, dtype):
    args = make_args(*SHAPES[name], dtype=dtype)
    k, v = lora_kv.lora_kv_projection(*args)
    assert k.shape == v.shape == (args[0].shape[0], args[0].shape[1], args[1].shape[0])
    assert k.dtype == v.dtype == dtype and k.device == args[0].device
    check((k, v), args, reference.lora_kv_projection, args)


@pytest.mark.parametrize(
    "shape,ids",
    [
        (dict(N=0, S=2), None),  # empty pool: every slot -1
        (dict(N=3, S=0), None),  # no slots
        (dict(N=3, S=2), [[-1, -1], [-1, -1]]),  # a pool, but no slot used
        (dict(N=3, r=0, S=2), [[0, 1], [2, -1]]),  # rank-0 pool
    ],
    ids=["N0", "S0", "all_empty", "r0"],
)
def test_forward_without_adapters_is_the_base_projection(shape, ids):
    c, w_k, w_v, *rest = make_args(dict(B=2, T=5, Din=7, Dout=6, **shape), ids)
    k, v = lora_kv.lora_kv_projection(c, w_k, w_v, *rest)
    torch.testing.assert_close(k, c @ w_k.T, **TOL32)
    torch.testing.assert_close(v, c @ w_v.T, **TOL32)


def test_mixed_ranks_zero_padded_add_only_their_true_rank():
    """Adapters of rank 1 and 3 in a pool padded to r = 4 give the unpadded low-rank sums."""
    c, w_k, w_v, a_k, b_k, a_v, b_v, _, _, scale = make_args(dict(B=2, T=6, Din=9, Dout=11, N=2, r=4, S=2))
    true_rank = [1, 3]
    for a, b in ((a_k, b_k), (a_v, b_v)):
        for n, rank in enumerate(true_rank):
            a[n, rank:] = 0
            b[n, :, rank:] = 0
    ids = torch.tensor([[0, 1], [1, -1]], device=DEVICE)
    weights = torch.tensor([[0.5, 2.0], [1.5, 3.0]], device=DEVICE)
    k, v = lora_kv.lora_kv_projection(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale)
    for out, w, a, b in ((k, w_k, a_k, b_k), (v, w_v, a_v, b_v)):
        want = c.double() @ w.double().T
        for bi, si in ((0, 0), (0, 1), (1, 0)):
            n = int(ids[bi, si])
            lo_a, lo_b = a[n, : true_rank[n]].double(), b[n, :, : true_rank[n]].double()
            want[bi] += float(weights[bi, si]) * scale * (c[bi].double() @ lo_a.T) @ lo_b.T
        torch.testing.assert_close(out.double(), want, **TOL32)


def test_noncontiguous_inputs_int32_ids_float64_weights():
    args = make_args(*SHAPES["T77"])
    c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale = args
    want = lora_kv.lora_kv_projection(*args)
    strided = (
        c.transpose(0, 1).contiguous().transpose(0, 1),
        w_k.T.contiguous().T,
        w_v.T.contiguous().T,
        a_k.transpose(1, 2).contiguous().transpose(1, 2),
        b_k.transpose(0, 2).contiguous().transpose(0, 2),
        a_v,
        b_v,
        ids.to(torch.int32),
        weights.double(),
        scale,
    )
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous()
    got = lora_kv.lora_kv_projection(*strided)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL32)


# ----------------------------------------------------------------------------- backward


def grads_for(args):
    c, w_k = args[0], args[1]
    shape = (c.shape[0], c.shape[1], w_k.shape[0])
    return torch.randn(shape, dtype=c.dtype, device=c.device), torch.randn(shape, dtype=c.dtype, device=c.device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["T77", "chunks"])
def test_backward_matches_reference(name, dtype):
    args = make_args(*SHAPES[name], dtype=dtype)
    full = (*grads_for(args), *args)
    got = lora_kv.lora_kv_projection_backward(*full)
    for g, t in zip(got, (args[0], args[3], args[4], args[5], args[6], args[8])):
        assert g.shape == t.shape and g.dtype == t.dtype
    check(got, full, reference.lora_kv_projection_backward, full)
    ids, (_, da_k, db_k, da_v, db_v, dweights) = args[7], got
    unused = [n for n in range(args[3].shape[0]) if n not in ids.tolist()[0] + ids.tolist()[1]]
    for g in (da_k, db_k, da_v, db_v):
        assert not g[unused].any(), "adapters no slot uses must get a zero gradient"
    assert not dweights[ids < 0].any(), "empty slots must get a zero weight gradient"


@pytest.mark.parametrize("shape", [dict(N=0, S=2), dict(N=3, S=0)], ids=["N0", "S0"])
def test_backward_without_adapters(shape):
    args = make_args(dict(B=2, T=5, Din=7, Dout=6, **shape))
    grad_k, grad_v = grads_for(args)
    dc, da_k, db_k, da_v, db_v, dweights = lora_kv.lora_kv_projection_backward(grad_k, grad_v, *args)
    torch.testing.assert_close(dc, grad_k @ args[1] + grad_v @ args[2], **TOL32)
    assert da_k.shape == args[3].shape and db_v.shape == args[6].shape and dweights.shape == args[8].shape
    assert not any(g.any() for g in (da_k, db_k, da_v, db_v, dweights))


class _Allocations(TorchDispatchMode):
    """Records the shape and dtype of every tensor that torch.zeros / empty / zeros_like makes."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.zeros, torch.ops.aten.empty, torch.ops.aten.zeros_like):
            self.made.append((tuple(out.shape), out.dtype))
        return out


def test_backward_allocates_fp32_scratch_per_slot_not_per_pool_adapter():
    """Regression: the backward zero-filled fp32 buffers the size of the whole adapter pool
    (≈ 1.7 GB per layer and call at N = 1000, r = 64, 2048 → 1280), then cast them. Its fp32
    scratch is now one row per slot of the batch; only the outputs have the pool's shape."""
    n_pool = 50
    args = make_args(dict(B=2, T=5, Din=8, Dout=6, N=n_pool, r=2, S=2), [[7, 7], [3, -1]], dtype=torch.float16)
    full = (*grads_for(args), *args)
    with _Allocations() as seen:
        got = lora_kv.lora_kv_projection_backward(*full)
    pool_fp32 = [m for m in seen.made if m[1] == torch.float32 and m[0] and m[0][0] == n_pool]
    assert not pool_fp32, f"pool-sized fp32 buffers: {pool_fp32}"
    check(got, full, reference.lora_kv_projection_backward, full)


def test_backward_repeats_within_the_fp32_atomics_tolerance():
    """What the backward promises run to run: adapter gradients and dweights are sums of fp32
    atomic adds (over the samples whose slots share an adapter, over T blocks for dweights), whose
    order the GPU does not fix, so repeated runs may differ in the last bits: within
    rtol = 1e-5 of each other in fp32 (a few ulps of a sum of B·S·T/16 terms), never more.
    The interpreter runs programs one after another and repeats exactly."""
    args = make_args(dict(B=4, T=40, Din=24, Dout=20, N=3, r=2, S=3), [[0, 1, 2], [0, 1, -1], [0, 2, 1], [0, 0, 0]])
    full = (*grads_for(args), *args)
    first = lora_kv.lora_kv_projection_backward(*full)
    for _ in range(3):
        again = lora_kv.lora_kv_projection_backward(*full)
        for a, b in zip(first, again):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_autograd_through_the_triton_backend():
    """The public op on the triton backend differentiates like the reference (c, a, b, weights)."""
    if "triton" not in ops.available_backends():
        pytest.skip("the triton backend is not registered in this installation")
    args = make_args(*SHAPES["T77"])
    leaves = [args[i].clone().requires_grad_() for i in (0, 3, 4, 5, 6, 8)]
    c, a_k, b_k, a_v, b_v, weights = leaves
    grads = []
    for backend in ("triton", "reference"):
        with ops.use_backend(backend):
            k, v = ops.lora_kv_projection(c, args[1], args[2], a_k, b_k, a_v, b_v, args[7], weights, args[9])
        grads.append(torch.autograd.grad((k * 1.5 - v).square().sum(), leaves))
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, **TOL32)


# ------------------------------------------------------------------------------ grouped


def layer_args(douts, B=2, T=9, Din=20, N=4, r=3, S=3, dtype=torch.float32):
    per_layer = [inputs.lora_kv(B=B, T=T, Din=Din, Dout=d, N=N, r=r, S=S, dtype=dtype, device=DEVICE) for d in douts]
    c = torch.stack([a[0] for a in per_layer])
    lists = [[a[i] for a in per_layer] for i in range(1, 7)]
    # Per-layer ids and weights (EWA gives each layer its own ψ): rows differ across layers,
    # including a repeated id, an empty row and all slots used.
    patterns = ([2, -1, 2], [-1, 0, 3], [-1, -1, -1], [1, 3, 0])
    ids = torch.tensor(
        [
            [patterns[(layer + row) % len(patterns)][:S] + [-1] * (S - 3) for row in range(B)]
            for layer in range(len(douts))
        ],
        device=DEVICE,
    )
    weights = torch.rand(len(douts), B, S, dtype=dtype, device=DEVICE) + 0.5
    return c, lists, ids, weights, 0.75


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_matches_per_layer_reference(dtype):
    douts = (24, 40, 17)
    c, lists, ids, weights, scale = layer_args(douts, dtype=dtype)
    ks, vs = lora_kv.lora_kv_projection_grouped(c, *lists, ids, weights, scale)
    assert len(ks) == len(vs) == len(douts)
    for layer, dout in enumerate(douts):
        args = (c[layer], *(lst[layer] for lst in lists), ids[layer], weights[layer], scale)
        assert ks[layer].shape == (2, 9, dout) and ks[layer].is_contiguous() and ks[layer].dtype == dtype
        check((ks[layer], vs[layer]), args, reference.lora_kv_projection, args)


def test_grouped_with_packed_weights_equals_lists():
    douts = (24, 40, 17)
    c, (w_k, w_v, a_k, b_k, a_v, b_v), ids, weights, scale = layer_args(douts)
    want = lora_kv.lora_kv_projection_grouped(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale)
    base = lora_kv.pack_layers(w_k, w_v)
    everything = lora_kv.pack_layers(w_k, w_v, a_k, b_k, a_v, b_v)
    got_base = lora_kv.lora_kv_projection_grouped(c, None, None, a_k, b_k, a_v, b_v, ids, weights, scale, packed=base)
    got_all = lora_kv.lora_kv_projection_grouped(c, *[None] * 6, ids, weights, scale, packed=everything)
    for got in (got_base, got_all):
        for g, w in zip(got[0] + got[1], want[0] + want[1]):
            assert torch.equal(g, w)
    with pytest.raises(ValueError, match="a_k is None"):
        lora_kv.lora_kv_projection_grouped(c, None, None, None, b_k, a_v, b_v, ids, weights, scale, packed=base)


# ------------------------------------------------------------------------------- why_not


def test_why_not():
    args = make_args(dict(), None)
    assert lora_kv.why_not(args) is None
    assert lora_kv.why_not((*grads_for(args), *args)) is None
    assert "float64" in lora_kv.why_not(upcast(args))
    grad_k, grad_v = grads_for(args)
    assert "grad_k" in lora_kv.why_not((grad_k.double(), grad_v, *args))


# ---------------------------------------------------------------------- GPU (SD-1.5 size)

SD15 = dict(B=2, T=77, Din=768, N=16, r=4, S=4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dout", [320, 1280])
def test_sd15_forward_and_backward(dout, dtype):
    args = make_args(dict(**SD15, Dout=dout), None, dtype=dtype)
    check(lora_kv.lora_kv_projection(*args), args, reference.lora_kv_projection, args)
    full = (*grads_for(args), *args)
    check(lora_kv.lora_kv_projection_backward(*full), full, reference.lora_kv_projection_backward, full)


@pytest.mark.gpu
def test_sd15_fp32_is_exact_without_tf32():
    args = make_args(dict(**SD15, Dout=640), None)
    check(lora_kv.lora_kv_projection(*args), args, reference.lora_kv_projection, args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sd15_grouped_all_layers(dtype):
    douts = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320)
    c, lists, ids, weights, scale = layer_args(douts, B=2, T=77, Din=768, N=16, r=4, S=3, dtype=dtype)
    ks, vs = lora_kv.lora_kv_projection_grouped(c, *lists, ids, weights, scale)
    for layer in range(len(douts)):
        args = (c[layer], *(lst[layer] for lst in lists), ids[layer], weights[layer], scale)
        check((ks[layer], vs[layer]), args, reference.lora_kv_projection, args)
