"""The Triton regional cross-attention kernels against the reference and the naive loops.

Runs on a CUDA device, or on the CPU under the Triton interpreter (``TRITON_INTERPRET=1`` set
before Python starts): there, fp32/fp16 only and tiny shapes. SD/SDXL shapes and bf16 are
GPU tests.
"""

import os

import pytest
import torch

if not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()):
    pytest.skip("the Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

import inputs  # noqa: E402
import naive_ops  # noqa: E402
from lifelong_engine.kernels import regional_attention as ra  # noqa: E402

from lifelong_engine import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances (FlashAttention's rule): the kernel's error against a reference computed in a
# higher precision from the same inputs may be at most FACTOR × the error of PyTorch doing the
# same computation in the inputs' dtype, plus a small absolute floor.
HIGHER = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float64}
FACTOR = 2.0
ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


def assert_fa_close(name, got, ref_high, ref_same):
    """|got − ref_high| ≤ FACTOR·|ref_same − ref_high| + atol, in the max norm."""
    assert got.shape == ref_high.shape and got.dtype == ref_same.dtype, name
    err = (got.to(ref_high.dtype) - ref_high).abs().max().item()
    torch_err = (ref_same.to(ref_high.dtype) - ref_high).abs().max().item()
    bound = FACTOR * torch_err + ATOL[got.dtype]
    assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (PyTorch {got.dtype} error {torch_err:.3g})"


def cast(args, dtype):
    """Floating tensors of args cast to dtype (integer tensors, None and scalars kept)."""
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def check_forward(args, dtype):
    args = cast(args, dtype)
    out = ra.regional_cross_attention(*args)
    ref_high = reference.regional_cross_attention(*cast(args, HIGHER[dtype]))
    assert_fa_close("out", out, ref_high, reference.regional_cross_attention(*args))
    return out


def check_backward(args, dtype, grad_out=None):
    args = cast(args, dtype)
    grad_out = torch.randn_like(args[0]) if grad_out is None else grad_out.to(dtype)
    grads = ra.regional_cross_attention_backward(grad_out, *args)
    high = reference.regional_cross_attention_backward(*cast((grad_out, *args), HIGHER[dtype]))
    same = reference.regional_cross_attention_backward(grad_out, *args)
    for name, g, gh, gs in zip(("dq", "dk", "dv"), grads, high, same):
        assert_fa_close(name, g, gh, gs)
    return grads


def regional(scale=None, **shape):
    args = inputs.regional(**shape, dtype=torch.float32, device=DEVICE)
    return (*args[:5], scale)


def box_regions(B, N, P, device=DEVICE):
    """Spatially compact regions, as boxes give them: the N queries as a near-square grid in
    row-major order, slot p ≥ 1 a box of its own, slot 0 everywhere else."""
    width = max(1, round(N**0.5))
    rows, cols = torch.arange(N) // width, torch.arange(N) % width
    height = (N + width - 1) // width
    ids = torch.zeros(B, N, dtype=torch.int64)
    for b in range(B):
        for p in range(1, P):
            r0, c0 = (b + p) % max(1, height // 2), (3 * p) % max(1, width // 2)
            inside = (rows >= r0) & (rows < r0 + height // 2) & (cols >= c0) & (cols < c0 + width // 2)
            ids[b, inside] = p
    return ids.to(device)


SHAPES = {
    "T77-d40-P3": dict(B=2, H=2, N=37, d=40, P=3, T=77),
    "T3-d8-P5": dict(B=1, H=3, N=20, d=8, P=5, T=3),
    "T5-d13-P2": dict(B=2, H=1, N=19, d=13, P=2, T=5),
    "T1-d8-P1": dict(B=1, H=2, N=17, d=8, P=1, T=1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("ragged", [True, False], ids=["kv_len", "no_kv_len"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_forward_and_backward_match_reference(shape, ragged, dtype):
    args = regional(**shape, ragged=ragged, scale=None if ragged else 0.3)
    check_forward(args, dtype)
    check_backward(args, dtype)


def test_rows_vectorise_only_when_every_row_stride_is_16_byte_aligned():
    """VEC (the launcher's promise that row strides are multiples of 16 bytes) is 16 bytes of
    elements for contiguous d = 40 and 1 when any row stride breaks it; the results agree."""
    q, k, v, region_ids, _, _ = regional(B=2, H=2, N=19, d=40, P=3, T=5)
    assert ra._vec(q.half(), k.half()) == 8 and ra._vec(q, k) == 4
    wide = torch.randn(2, 2, 19, 41, device=DEVICE)  # rows 41 elements apart
    odd_q = wide[..., :40].copy_(q)
    assert ra._vec(odd_q, k) == 1
    assert ra._vec(wide[:1, :1, :1, :40], k) == 4  # strides of length-1 dims are never used
    torch.testing.assert_close(
        ra.regional_cross_attention(odd_q, k, v, region_ids), ra.regional_cross_attention(q, k, v, region_ids)
    )


def test_forward_matches_naive_loops():
    args = regional(B=2, H=2, N=11, d=8, P=3, T=6)
    out = ra.regional_cross_attention(*args)
    torch.testing.assert_close(out, naive_ops.regional_cross_attention(*(a.cpu() for a in args[:5])).to(DEVICE))


def test_ignored_keys_and_unused_slots_are_never_read():
    """Keys past kv_len and slots no query uses cannot change anything, even when they hold NaN;
    unused slots get exactly zero dk, dv."""
    B, H, N, d, P, T = 2, 2, 30, 8, 5, 9
    q, k, v, _, _, _ = regional(B=B, H=H, N=N, d=d, P=P, T=T)
    region_ids = torch.where(box_regions(B, N, 3) == 1, 3, 0)  # slots 1, 2 and 4 unused
    kv_len = torch.tensor([[4, 9, 1, 7, 2], [9, 3, 5, 1, 6]], device=DEVICE)
    clean = (q, k, v, region_ids, kv_len, None)
    out = check_forward(clean, torch.float32)
    grad_out = torch.randn_like(q)
    dq, dk, dv = check_backward(clean, torch.float32, grad_out)

    past_kv_len = torch.arange(T, device=DEVICE)[None, None, None, :, None] >= kv_len[:, :, None, None, None]
    unused_slot = torch.tensor([False, True, True, False, True], device=DEVICE)[None, :, None, None, None]
    ignored = (past_kv_len | unused_slot).expand(B, P, H, T, d)
    k_nan, v_nan = k.masked_fill(ignored, float("nan")), v.masked_fill(ignored, float("nan"))
    dirty = (q, k_nan, v_nan, region_ids, kv_len, None)
    assert torch.equal(ra.regional_cross_attention(*dirty), out)
    dq2, dk2, dv2 = ra.regional_cross_attention_backward(grad_out, *dirty)
    assert torch.equal(dq2, dq) and torch.equal(dk2, dk) and torch.equal(dv2, dv)
    assert not dk[:, [1, 2, 4]].any() and not dv[:, [1, 2, 4]].any()


def test_any_strides_and_index_dtypes():
    """Non-contiguous q, k, v (head-interleaved layouts, as projections produce them), int32
    region_ids and kv_len, and an expanded (zero-stride) grad_out."""
    B, H, N, d, P, T = 2, 3, 21, 24, 2, 11
    q = torch.randn(B, N, H, d, device=DEVICE).transpose(1, 2)
    k = torch.randn(B, P, T, H, d, device=DEVICE).transpose(2, 3)
    v = torch.randn(B, P, T, H, 2 * d, device=DEVICE)[..., ::2].transpose(2, 3)
    region_ids = torch.randint(0, P, (B, 2 * N), device=DEVICE, dtype=torch.int32)[:, ::2]
    kv_len = torch.randint(1, T + 1, (P, B), device=DEVICE, dtype=torch.int32).T
    args = (q, k, v, region_ids, kv_len, 0.2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or region_ids.is_contiguous())
    check_forward(args, torch.float32)
    check_backward(args, torch.float32, torch.randn(1, 1, 1, d, device=DEVICE).expand(B, H, N, d))


@pytest.mark.parametrize(
    "cfg",
    [
        ra.TileConfig(block_n=16, block_t=16, block_d=32, num_warps=4, num_chunks=3),  # keys over 5 tiles
        ra.TileConfig(block_n=16, block_t=128, block_d=32, num_warps=4, num_chunks=2),  # keys in one tile
    ],
    ids=["multi-tile-T", "one-tile-T"],
)
def test_tile_paths(cfg):
    """Paths the default tiles take only at large shapes: key tiles past kv_len, the two-pass
    backward (lse and D from the forward kernel), several query blocks per chunk and several
    chunks summed for dk, dv."""
    q, k, v, region_ids, kv_len, _ = regional(B=2, H=2, N=70, d=20, P=3, T=77)
    kv_len[0, 0], kv_len[1, 2] = 77, 16
    scale = 0.25
    out = ra._forward(q, k, v, region_ids, kv_len, scale, cfg)
    high = cast((q, k, v, region_ids, kv_len, scale), torch.float64)
    assert_fa_close(
        "out",
        out,
        reference.regional_cross_attention(*high),
        reference.regional_cross_attention(q, k, v, region_ids, kv_len, scale),
    )
    grad_out = torch.randn_like(q)
    grads = ra._backward(grad_out, q, k, v, region_ids, kv_len, scale, cfg)
    ref = reference.regional_cross_attention_backward(grad_out.double(), *high)
    same = reference.regional_cross_attention_backward(grad_out, q, k, v, region_ids, kv_len, scale)
    for name, g, gh, gs in zip(("dq", "dk", "dv"), grads, ref, same):
        assert_fa_close(name, g, gh, gs)


def test_empty_queries():
    q, k, v, region_ids, kv_len, _ = regional(B=2, H=2, N=0, d=8, P=2, T=3)
    assert ra.regional_cross_attention(q, k, v, region_ids, kv_len).shape == (2, 2, 0, 8)
    dq, dk, dv = ra.regional_cross_attention_backward(torch.zeros_like(q), q, k, v, region_ids, kv_len)
    assert dq.shape == q.shape and not dk.any() and not dv.any()


def test_why_not():
    args = regional(B=1, H=2, N=5, d=8, P=2, T=3)
    grad = (torch.zeros_like(args[0]),)
    assert ra.why_not(args) is None and ra.why_not(grad + args) is None
    assert ra.why_not(cast(args, torch.float16)) is None
    assert "float64" in ra.why_not(cast(args, torch.float64))
    assert "grad_out" in ra.why_not((grad[0].double(), *args))
    wide = regional(B=1, H=1, N=2, d=ra.MAX_HEAD_DIM + 1, P=1, T=2)
    assert "head dim" in ra.why_not(wide)


def test_tile_config_defaults():
    """Every tile is a power of two ≥ 16 (tl.dot), the head dim fits one tile, and T = 77 with the
    SD/SDXL head dims ≤ 64 is one key tile (the single-pass backward)."""
    for d in (8, 40, 64, 80, 160, 256):
        for dtype in (torch.float16, torch.float32):
            q, k = torch.empty(2, 8, 4096, d, dtype=dtype), torch.empty(2, 3, 8, 77, d, dtype=dtype)
            for backward in (False, True):
                cfg = ra.tile_config(q, k, backward=backward)
                for n in (cfg.block_n, cfg.block_t, cfg.block_d):
                    assert n >= 16 and n & (n - 1) == 0
                assert cfg.block_d >= d and cfg.num_chunks >= 1
                if dtype == torch.float16 and d <= 64:
                    assert cfg.block_t >= 77


# ------------------------------------------------------------------------------ GPU

GPU_SHAPES = {
    "sd15-N4096-d40": dict(B=2, H=8, N=4096, d=40, P=3, T=77),
    "sd15-N1024-d80": dict(B=2, H=8, N=1024, d=80, P=3, T=77),
    "sd15-N64-d160": dict(B=2, H=8, N=64, d=160, P=3, T=77),
    "sdxl-H10-d64": dict(B=2, H=10, N=4096, d=64, P=3, T=77),
    "sdxl-H20-d64": dict(B=2, H=20, N=1024, d=64, P=3, T=77),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES.values()), ids=list(GPU_SHAPES))
def test_gpu_sd_shapes(shape, dtype):
    q, k, v, _, kv_len, _ = regional(**shape)
    args = (q, k, v, box_regions(shape["B"], shape["N"], shape["P"]), kv_len, None)
    check_forward(args, dtype)
    check_backward(args, dtype)


@pytest.mark.gpu
def test_gpu_plain_cross_attention_matches_sdpa():
    """P = 1 without kv_len is plain cross-attention: same answer as PyTorch's SDPA."""
    q, k, v, region_ids, _, _ = regional(B=2, H=8, N=4096, d=40, P=1, T=77)
    q, k, v = (x.half() for x in (q, k, v))
    out = ra.regional_cross_attention(q, k, v, region_ids, None, None)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k[:, 0], v[:, 0])
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k[:, 0].float(), v[:, 0].float())
    assert_fa_close("out", out, ref, sdpa)


@pytest.mark.gpu
def test_gpu_plain_cross_attention_through_the_op_runs_sdpa_forward_and_the_kernel_backward():
    """The triton backend hands P = 1 without kv_len to SDPA (faster on an H200); the backward is the
    kernel's. Both against the fp32 reference through the public op."""
    from lifelong_engine import ops

    q, k, v, region_ids, _, _ = regional(B=2, H=8, N=1024, d=80, P=1, T=77)
    leaves = [x.half().requires_grad_(True) for x in (q, k, v)]
    with ops.use_backend("triton"):
        out = ops.regional_cross_attention(*leaves, region_ids)
    out.float().sum().backward()
    exact = [x.detach().float().requires_grad_(True) for x in leaves]
    want = reference.regional_cross_attention(*exact, region_ids)
    want.sum().backward()
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=2e-3)
    for got, ref in zip(leaves, exact):
        torch.testing.assert_close(got.grad.float(), ref.grad, atol=2e-2, rtol=2e-2)
