"""Training losses: each against its formula written out with explicit loops, fp64 gradcheck,
the closed-form steps against independent least-squares / KKT solutions, and argument errors."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from lifelong_engine.training import losses

f64 = dict(dtype=torch.float64)


def rnd(*shape, grad=False, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def frob2(x):
    """‖x‖_F² with a Python loop over the entries."""
    return sum(float(v) ** 2 for v in x.detach().flatten().tolist())


def matmul_loop(a, b):
    """a·b with explicit loops (independent of torch's matmul)."""
    n, k = a.shape
    k2, m = b.shape
    assert k == k2
    out = torch.zeros(n, m, **f64)
    for i, j in itertools.product(range(n), range(m)):
        out[i, j] = sum(float(a[i, p]) * float(b[p, j]) for p in range(k))
    return out


# ------------------------------------------------------------------------------ CIDM R1


def test_orthogonal_subspace_loss_matches_loops():
    """R1 on the up projections (peft lora_B, (Dout, r)): Σ_i ‖b_i·b_newᵀ‖_F², ranks zero-padded."""
    dout, ranks = 7, [3, 1, 5]
    b_prev, b_new = [rnd(dout, r) for r in ranks], rnd(dout, 2)
    expected = 0.0
    for b in b_prev:
        shared = min(b.shape[1], b_new.shape[1])  # padded rank components are zero
        for p, q in itertools.product(range(dout), range(dout)):
            expected += sum(float(b[p, k]) * float(b_new[q, k]) for k in range(shared)) ** 2
    got = losses.orthogonal_subspace_loss(b_prev, b_new)
    assert got.shape == () and got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(expected, **f64), rtol=1e-12, atol=0)


def test_orthogonal_subspace_loss_zero_for_disjoint_rank_components():
    dout = 9
    b_prev = torch.zeros(dout, 3, **f64)
    b_prev[:, 0] = rnd(dout)
    b_new = torch.zeros(dout, 3, **f64)
    b_new[:, 1:] = rnd(dout, 2)
    assert float(losses.orthogonal_subspace_loss([b_prev], b_new)) == 0.0
    b_new[:, 0] = rnd(dout)  # a shared rank component overlaps
    assert float(losses.orthogonal_subspace_loss([b_prev], b_new)) > 0.5


def test_orthogonal_subspace_loss_empty_past():
    a_new = rnd(3, 5, grad=True)
    loss = losses.orthogonal_subspace_loss([], a_new)
    assert loss.shape == () and loss.dtype == a_new.dtype and loss.device == a_new.device
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(a_new.grad, torch.zeros_like(a_new))
    with_inf = torch.full((2, 3), float("inf"), requires_grad=True)
    assert losses.orthogonal_subspace_loss([], with_inf).item() == 0.0  # not inf·0 = nan


def test_orthogonal_subspace_loss_gradcheck():
    args = (rnd(5, 2, grad=True), rnd(5, 4, grad=True), rnd(5, 3, grad=True))
    assert gradcheck(lambda a1, a2, new: losses.orthogonal_subspace_loss([a1, a2], new), args)


# ------------------------------------------------------------------------------ CIDM R2


def shared_inputs(n=3, dout=4, din=7, grad=False):
    return (
        [rnd(dout, din, grad=grad) for _ in range(n)],
        [rnd(dout, dout, grad=grad) for _ in range(n)],
        rnd(dout, din, grad=grad),
    )


def r2_loops(deltas, h, w):
    return sum(frob2(d.detach() - matmul_loop(hi.detach(), w.detach())) for d, hi in zip(deltas, h))


def test_shared_subspace_loss_matches_loops():
    deltas, h, w = shared_inputs(n=3, dout=5, din=3)
    torch.testing.assert_close(
        losses.shared_subspace_loss(deltas, h, w), torch.tensor(r2_loops(deltas, h, w), **f64), rtol=1e-12, atol=0
    )


def test_shared_subspace_loss_empty_and_gradcheck():
    w = rnd(3, 4, grad=True)
    zero = losses.shared_subspace_loss([], [], w)
    assert zero.item() == 0.0 and zero.grad_fn is not None
    deltas, h, w = shared_inputs(n=2, dout=3, din=5, grad=True)
    assert gradcheck(lambda d0, d1, h0, h1, w: losses.shared_subspace_loss([d0, d1], [h0, h1], w), (*deltas, *h, w))


@pytest.mark.parametrize("dout,din", [(4, 7), (7, 3)], ids=["Dout<Din", "Dout>Din (W Wt singular)"])
def test_shared_subspace_update_never_increases_r2(dout, din):
    deltas, h0, w0 = shared_inputs(n=4, dout=dout, din=din)
    h, w = h0, w0
    r2 = [float(losses.shared_subspace_loss(deltas, h, w))]
    for _ in range(8):
        h, w = losses.shared_subspace_update(deltas, h, w)
        r2.append(float(losses.shared_subspace_loss(deltas, h, w)))
    assert all(b <= a for a, b in zip(r2, r2[1:])), r2
    assert r2[-1] < 0.9 * r2[0]
    h8, w8 = losses.shared_subspace_update(deltas, h0, w0, iters=8)  # iters=k is k single rounds
    torch.testing.assert_close(w8, w)
    torch.testing.assert_close(torch.stack(h8), torch.stack(h))


def test_shared_subspace_update_keeps_the_better_value():
    """A half-step that would raise R2 is not taken: from an exact optimum, a large ridge changes nothing."""
    deltas, h, w = shared_inputs(n=3, dout=4, din=7)
    h, w = losses.shared_subspace_update(deltas, h, w, iters=20, eps=0.0)
    h_big, w_big = losses.shared_subspace_update(deltas, h, w, eps=1e3)
    assert float(losses.shared_subspace_loss(deltas, h_big, w_big)) <= float(losses.shared_subspace_loss(deltas, h, w))
    torch.testing.assert_close(w_big, w, rtol=0, atol=0)


def test_shared_subspace_update_is_least_squares():
    """H_i is the exact LS solution of H_i·W = Δ_i for the input W; W_* then the LS solution for that H."""
    deltas, h, w = shared_inputs(n=3, dout=4, din=7)
    h1, w1 = losses.shared_subspace_update(deltas, h, w, iters=1, eps=0.0)
    for d, hi in zip(deltas, h1):
        h_ls = torch.linalg.lstsq(w.T, d.T).solution.T  # min ‖H·W − Δ‖ ⇔ min ‖Wᵀ·Hᵀ − Δᵀ‖
        torch.testing.assert_close(hi, h_ls, rtol=1e-10, atol=1e-10)
    w_ls = torch.linalg.lstsq(torch.cat(h1), torch.cat(deltas)).solution  # min Σ_i ‖H_i·W − Δ_i‖
    torch.testing.assert_close(w1, w_ls, rtol=1e-10, atol=1e-10)
    # the default ridge only moves the solution by O(eps)
    h_eps, w_eps = losses.shared_subspace_update(deltas, h, w)
    torch.testing.assert_close(torch.stack(h_eps), torch.stack(h1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w_eps, w1, rtol=1e-4, atol=1e-4)


def test_shared_subspace_update_dtype_and_no_grad():
    deltas, h, w = shared_inputs(n=2, dout=3, din=5)
    deltas, h, w = [d.float() for d in deltas], [x.float() for x in h], w.float().requires_grad_()
    h1, w1 = losses.shared_subspace_update(deltas, h, w, iters=2)
    assert w1.dtype == torch.float32 and all(x.dtype == torch.float32 for x in h1)
    assert not w1.requires_grad and not any(x.requires_grad for x in h1)


def test_shared_subspace_update_singular_without_eps():
    deltas, h, _ = shared_inputs(n=2, dout=4, din=2)  # W Wᵀ (4×4) has rank 2
    with pytest.raises(ValueError, match="eps > 0"):
        losses.shared_subspace_update(deltas, h, torch.zeros(4, 2, **f64), eps=0.0)


def test_init_shared_subspace():
    deltas, _, _ = shared_inputs(n=3, dout=4, din=6)
    h, w = losses.init_shared_subspace(deltas)
    torch.testing.assert_close(w, (deltas[0] + deltas[1] + deltas[2]) / 3)
    assert len(h) == 3 and all(torch.equal(x, torch.eye(4, **f64)) for x in h)
    h1, w1 = losses.shared_subspace_update(deltas, h, w)
    assert float(losses.shared_subspace_loss(deltas, h1, w1)) <= float(losses.shared_subspace_loss(deltas, h, w))
    with pytest.raises(ValueError, match="mean of deltas is zero"):
        losses.init_shared_subspace([deltas[0], -deltas[0]])
    with pytest.raises(ValueError, match="deltas is empty"):
        losses.init_shared_subspace([])


# ------------------------------------------------------------------------------ C-LoRA


def test_c_lora_forget_loss_matches_loops_and_gradcheck():
    prev, delta = rnd(5, 3, grad=True), rnd(5, 3, grad=True)
    p, d = prev.detach(), delta.detach()
    expected = sum((float(p[i, j]) * float(d[i, j])) ** 2 for i, j in itertools.product(range(5), range(3)))
    torch.testing.assert_close(losses.c_lora_forget_loss(prev, delta), torch.tensor(expected, **f64))
    assert gradcheck(losses.c_lora_forget_loss, (prev, delta))


# ------------------------------------------------------------------- diffusion losses


def masked_mse_loops(pred, target, mask):
    b, c, hgt, wid = pred.shape
    mask = mask.reshape(b, hgt, wid).double()
    num = den = 0.0
    for i, ch, y, x in itertools.product(range(b), range(c), range(hgt), range(wid)):
        m = float(mask[i, y, x])
        num += m * (float(pred[i, ch, y, x]) - float(target[i, ch, y, x])) ** 2
        den += m
    return num / den


@pytest.mark.parametrize("mask_shape", [None, "B1HW", "BHW", "bool"])
def test_diffusion_loss_matches_loops(mask_shape):
    b, c, hgt, wid = 2, 3, 5, 7
    pred, target = rnd(b, c, hgt, wid), rnd(b, c, hgt, wid)
    if mask_shape is None:
        mask, expected = None, frob2(pred - target) / pred.numel()
    else:
        soft = torch.rand(b, hgt, wid, **f64)
        mask = {"B1HW": soft[:, None], "BHW": soft, "bool": soft > 0.5}[mask_shape]
        expected = masked_mse_loops(pred, target, mask)
    got = losses.diffusion_loss(pred, target, mask)
    torch.testing.assert_close(got, torch.tensor(expected, **f64), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        losses.prior_preservation_loss(pred, target, weight=0.3, mask=mask), torch.tensor(0.3 * expected, **f64)
    )


def test_diffusion_loss_half_precision_accumulates_in_fp32():
    pred, target = rnd(2, 4, 3, 3).to(torch.bfloat16), rnd(2, 4, 3, 3)
    got = losses.diffusion_loss(pred, target, torch.ones(2, 3, 3))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.mse_loss(pred.float(), target.float()))


def test_diffusion_loss_gradcheck():
    pred, target = rnd(2, 2, 3, 3, grad=True), rnd(2, 2, 3, 3, grad=True)
    mask = torch.rand(2, 1, 3, 3, **f64)
    assert gradcheck(lambda p, t: losses.diffusion_loss(p, t, mask), (pred, target))
    assert gradcheck(lambda p, t: losses.prior_preservation_loss(p, t, 0.5), (pred, target))


def test_diffusion_loss_zero_mask():
    with pytest.raises(ValueError, match="mask sums to 0.0"):
        losses.diffusion_loss(rnd(2, 3, 4, 4), rnd(2, 3, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="prior_preservation_loss: mask sums to"):
        losses.prior_preservation_loss(
            rnd(1, 3, 4, 4), rnd(1, 3, 4, 4), mask=torch.zeros(1, 1, 4, 4, dtype=torch.bool)
        )


def test_distillation_loss_matches_loops():
    b = 3
    student, teacher, weights = rnd(b, 2, 3, 5), rnd(b, 2, 3, 5), torch.rand(b, **f64)
    per_sample = [frob2(student[i] - teacher[i]) / student[i].numel() for i in range(b)]
    torch.testing.assert_close(
        losses.distillation_loss(student, teacher), torch.tensor(sum(per_sample) / b, **f64), rtol=1e-12, atol=0
    )
    expected = sum(float(weights[i]) * per_sample[i] for i in range(b)) / b
    torch.testing.assert_close(
        losses.distillation_loss(student, teacher, weights), torch.tensor(expected, **f64), rtol=1e-12, atol=0
    )


def test_distillation_loss_gradients_and_frozen_teacher():
    student, weights = rnd(3, 2, 4, grad=True), rnd(3, grad=True)
    teacher = rnd(3, 2, 4, grad=True)
    assert gradcheck(lambda s, w: losses.distillation_loss(s, teacher, w), (student, weights))
    losses.distillation_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


# ---------------------------------------------------------------------------------- EWC


def ewc_inputs(grad=False):
    shapes = {"down": (2, 5), "up": (3, 2), "bias": (3,)}
    params = {k: rnd(*s, grad=grad) for k, s in shapes.items()}
    anchors = {k: rnd(*s) for k, s in shapes.items()}
    fisher = {k: torch.rand(*s, **f64) for k, s in shapes.items()}
    return params, anchors, fisher


def test_ewc_penalty_matches_loops_and_gradcheck():
    params, anchors, fisher = ewc_inputs(grad=True)
    expected = 0.0
    for k in params:
        for f, p, a in zip(fisher[k].flatten().tolist(), params[k].flatten().tolist(), anchors[k].flatten().tolist()):
            expected += f * (p - a) ** 2
    torch.testing.assert_close(losses.ewc_penalty(params, anchors, fisher), torch.tensor(expected, **f64))
    keys = list(params)
    assert gradcheck(
        lambda *ps: losses.ewc_penalty(dict(zip(keys, ps)), anchors, fisher), tuple(params[k] for k in keys)
    )


def test_ewc_penalty_key_mismatch():
    params, anchors, fisher = ewc_inputs()
    with pytest.raises(ValueError, match=r"anchors keys differ from params keys: missing \['up'\], unexpected \[\]"):
        losses.ewc_penalty(params, {k: v for k, v in anchors.items() if k != "up"}, fisher)
    with pytest.raises(ValueError, match=r"fisher keys differ .* unexpected \['extra'\]"):
        losses.ewc_penalty(params, anchors, {**fisher, "extra": torch.ones(1)})
    with pytest.raises(ValueError, match=r"fisher\['bias'\] has shape \(4,\)"):
        losses.ewc_penalty(params, anchors, {**fisher, "bias": torch.ones(4)})


def test_update_fisher_is_running_mean_of_squared_grads():
    grads = [{"a": rnd(2, 3), "b": rnd(4)} for _ in range(5)]
    fisher = {}
    for n, g in enumerate(grads, start=1):
        fisher = losses.update_fisher(fisher, g, n)
    for k in ("a", "b"):
        torch.testing.assert_close(fisher[k], torch.stack([g[k] ** 2 for g in grads]).mean(0))
    with pytest.raises(ValueError, match="grads keys differ from fisher keys"):
        losses.update_fisher(fisher, {"a": rnd(2, 3)}, 6)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        losses.update_fisher(fisher, grads[0], 0)


# --------------------------------------------------------------------- Custom Diffusion


def merge_inputs(dout=3, din=7, n_reg=11, ranks=(2, 1, 1)):
    w0, c_reg = rnd(dout, din), rnd(n_reg, din)
    finetuned = [(w0 + 0.1 * rnd(dout, din), rnd(n, din)) for n in ranks]
    return w0, c_reg, finetuned


def reg_objective(w, w0, c_reg):
    return frob2(matmul_loop(w - w0, c_reg.T))


def test_custom_diffusion_merge_meets_constraints():
    w0, c_reg, finetuned = merge_inputs()
    w = losses.custom_diffusion_merge(w0, c_reg, finetuned)
    for w_i, c_i in finetuned:
        torch.testing.assert_close(w @ c_i.T, w_i @ c_i.T, rtol=0, atol=1e-8)


def test_custom_diffusion_merge_matches_kkt_solution():
    """Independent solve: each row x of W − W0 minimises x·M·xᵀ s.t. x·Cᵀ = r, via its KKT system."""
    w0, c_reg, finetuned = merge_inputs()
    w = losses.custom_diffusion_merge(w0, c_reg, finetuned, eps=0.0)
    c = torch.cat([c_i for _, c_i in finetuned])
    r = torch.cat([(w_i - w0) @ c_i.T for w_i, c_i in finetuned], dim=1)  # (Dout, m)
    m, din = c.shape
    kkt = torch.zeros(din + m, din + m, **f64)
    kkt[:din, :din], kkt[:din, din:], kkt[din:, :din] = 2 * c_reg.T @ c_reg, c.T, c
    for row in range(w0.shape[0]):
        sol = torch.linalg.solve(kkt, torch.cat([torch.zeros(din, **f64), r[row]]))
        torch.testing.assert_close(w[row], w0[row] + sol[:din], rtol=1e-9, atol=1e-9)


def test_custom_diffusion_merge_is_the_constrained_minimum():
    """Any perturbation P with P·Cᵀ = 0 keeps the constraints and raises the objective by exactly
    ‖P·C_regᵀ‖² (no first-order term: W is stationary on the feasible set)."""
    w0, c_reg, finetuned = merge_inputs()
    w = losses.custom_diffusion_merge(w0, c_reg, finetuned, eps=0.0)
    c = torch.cat([c_i for _, c_i in finetuned])
    null = torch.eye(c.shape[1], **f64) - torch.linalg.pinv(c) @ c  # projector onto {x : x·Cᵀ = 0}
    base = reg_objective(w, w0, c_reg)
    for scale in (1e-3, 1.0):
        p = scale * rnd(*w0.shape) @ null
        feasible = w + p
        for w_i, c_i in finetuned:
            torch.testing.assert_close(feasible @ c_i.T, w_i @ c_i.T, rtol=0, atol=1e-8)
        increase = reg_objective(feasible, w0, c_reg) - base
        assert increase > 0
        torch.testing.assert_close(increase, frob2(p @ c_reg.T), rtol=1e-6, atol=1e-12)


def test_custom_diffusion_merge_dtype_and_trivial_cases():
    w0, c_reg, finetuned = merge_inputs()
    w32 = losses.custom_diffusion_merge(w0.float(), c_reg.float(), [(a.float(), b.float()) for a, b in finetuned])
    assert w32.dtype == torch.float32
    torch.testing.assert_close(w32, losses.custom_diffusion_merge(w0, c_reg, finetuned).float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(losses.custom_diffusion_merge(w0, c_reg, []), w0)
    # a single concept whose own weight is W0 changes nothing
    torch.testing.assert_close(losses.custom_diffusion_merge(w0, c_reg, [(w0, rnd(2, 7))]), w0)


def test_custom_diffusion_merge_rank_deficient_constraints():
    w0, c_reg, finetuned = merge_inputs()
    w1, c1 = finetuned[0]
    with pytest.raises(ValueError, match=r"have rank 2.*duplicated or collinear"):
        losses.custom_diffusion_merge(w0, c_reg, [(w1, c1), (finetuned[1][0], c1[:1].clone())])
    with pytest.raises(ValueError, match=r"m = 8 > Din = 7"):
        losses.custom_diffusion_merge(w0, c_reg, [(w1, rnd(8, 7))])


def test_custom_diffusion_merge_few_reg_rows_needs_eps():
    w0, c_reg, finetuned = merge_inputs(n_reg=3)  # C_regᵀ·C_reg has rank 3 < Din
    with pytest.raises(ValueError, match="use eps > 0"):
        losses.custom_diffusion_merge(w0, c_reg, finetuned, eps=0.0)
    w = losses.custom_diffusion_merge(w0, c_reg, finetuned)
    for w_i, c_i in finetuned:
        torch.testing.assert_close(w @ c_i.T, w_i @ c_i.T, rtol=0, atol=1e-8)


# ------------------------------------------------------------------------- bad arguments


def _meta(*shape):
    return torch.empty(*shape, device="meta", **f64)


BAD = {
    "r1 b_new 1-D": (lambda: losses.orthogonal_subspace_loss([rnd(5, 2)], rnd(5)), ValueError, "b_new must be 2-D"),
    "r1 b_prev height": (
        lambda: losses.orthogonal_subspace_loss([rnd(5, 2), rnd(4, 3)], rnd(5, 2)),
        ValueError,
        r"b_prev\[1\] has shape \(4, 3\); expected \(5, 3\)",
    ),
    "r1 b_prev device": (
        lambda: losses.orthogonal_subspace_loss([_meta(5, 2)], rnd(5, 2)),
        ValueError,
        r"b_prev\[0\] is on meta",
    ),
    "r1 b_new int": (
        lambda: losses.orthogonal_subspace_loss([], torch.ones(5, 2, dtype=torch.int64)),
        TypeError,
        "b_new must be a floating-point",
    ),
    "r2 h count": (
        lambda: losses.shared_subspace_loss([rnd(3, 5)] * 2, [rnd(3, 3)], rnd(3, 5)),
        ValueError,
        "h has 1 matrices; expected 2",
    ),
    "r2 delta shape": (
        lambda: losses.shared_subspace_loss([rnd(3, 5), rnd(3, 4)], [rnd(3, 3)] * 2, rnd(3, 5)),
        ValueError,
        r"deltas\[1\] has shape \(3, 4\); expected \(3, 5\)",
    ),
    "r2 h shape": (
        lambda: losses.shared_subspace_loss([rnd(3, 5)], [rnd(5, 5)], rnd(3, 5)),
        ValueError,
        r"h\[0\] has shape \(5, 5\); expected \(3, 3\)",
    ),
    "r2 w_shared 3-D": (
        lambda: losses.shared_subspace_loss([], [], rnd(1, 3, 5)),
        ValueError,
        "w_shared must be 2-D",
    ),
    "update empty": (
        lambda: losses.shared_subspace_update([], [], rnd(3, 5)),
        ValueError,
        "shared_subspace_update: deltas is empty",
    ),
    "update iters": (
        lambda: losses.shared_subspace_update([rnd(3, 5)], [rnd(3, 3)], rnd(3, 5), iters=0),
        ValueError,
        "iters must be an integer >= 1",
    ),
    "update eps": (
        lambda: losses.shared_subspace_update([rnd(3, 5)], [rnd(3, 3)], rnd(3, 5), eps=-1.0),
        ValueError,
        "eps must be a finite number >= 0",
    ),
    "c-lora shape": (
        lambda: losses.c_lora_forget_loss(rnd(3, 4), rnd(3, 5)),
        ValueError,
        r"prev_delta_sum has shape \(3, 4\); expected \(3, 5\)",
    ),
    "mse target shape": (
        lambda: losses.diffusion_loss(rnd(2, 3, 4, 4), rnd(2, 3, 4, 5)),
        ValueError,
        "diffusion_loss: target has shape",
    ),
    "mse mask shape": (
        lambda: losses.diffusion_loss(rnd(2, 3, 4, 4), rnd(2, 3, 4, 4), torch.ones(2, 8, 8)),
        ValueError,
        r"mask has shape \(2, 8, 8\); expected \(2, 1, 4, 4\) or \(2, 4, 4\)",
    ),
    "mse mask on 3-D pred": (
        lambda: losses.diffusion_loss(rnd(2, 3, 4), rnd(2, 3, 4), torch.ones(2, 3, 4)),
        ValueError,
        "pred must be 4-D",
    ),
    "prior weight": (
        lambda: losses.prior_preservation_loss(rnd(1, 2), rnd(1, 2), weight=float("nan")),
        ValueError,
        "weight must be a finite number",
    ),
    "distill weights": (
        lambda: losses.distillation_loss(rnd(3, 4), rnd(3, 4), torch.ones(2, **f64)),
        ValueError,
        r"weights has shape \(2,\); expected \(3,\)",
    ),
    "distill teacher": (
        lambda: losses.distillation_loss(rnd(3, 4), rnd(3, 5)),
        ValueError,
        "teacher has shape",
    ),
    "ewc empty": (lambda: losses.ewc_penalty({}, {}, {}), ValueError, "params is empty"),
    "merge c_reg width": (
        lambda: losses.custom_diffusion_merge(rnd(3, 7), rnd(5, 6), []),
        ValueError,
        r"c_reg has shape \(5, 6\); expected \(5, 7\)",
    ),
    "merge W_i shape": (
        lambda: losses.custom_diffusion_merge(rnd(3, 7), rnd(5, 7), [(rnd(4, 7), rnd(1, 7))]),
        ValueError,
        r"finetuned\[0\]\[0\] has shape \(4, 7\); expected \(3, 7\)",
    ),
    "merge C_i width": (
        lambda: losses.custom_diffusion_merge(rnd(3, 7), rnd(5, 7), [(rnd(3, 7), rnd(2, 6))]),
        ValueError,
        r"finetuned\[0\]\[1\] has shape \(2, 6\); expected \(2, 7\)",
    ),
    "merge not a pair": (
        lambda: losses.custom_diffusion_merge(rnd(3, 7), rnd(5, 7), [rnd(3, 7)]),
        ValueError,
        r"finetuned\[0\] must be a pair",
    ),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_arguments_name_the_argument(case):
    call, error, message = case
    with pytest.raises(error, match=message):
        call()
