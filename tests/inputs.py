"""Random inputs for the fused ops, shared by the op, autograd and kernel tests."""

import torch


def lora_kv(B=2, T=5, Din=7, Dout=6, N=3, r=2, S=2, dtype=torch.float64, device="cpu", empty=True, grad=False):
    """Arguments of lora_kv_projection; ids mix real adapters, repeats and (if empty) -1 slots."""

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, dtype=dtype) * std).to(device).requires_grad_(grad)

    ids = torch.randint(0, max(N, 1), (B, S)) if N else torch.full((B, S), -1)
    if empty and S:
        ids[0, -1] = -1
    weights = (torch.rand(B, S, dtype=dtype) + 0.5).to(device).requires_grad_(grad)
    return (
        rnd(B, T, Din),
        rnd(Dout, Din, std=Din**-0.5),
        rnd(Dout, Din, std=Din**-0.5),
        rnd(N, r, Din, std=Din**-0.5),
        rnd(N, Dout, r),
        rnd(N, r, Din, std=Din**-0.5),
        rnd(N, Dout, r),
        ids.to(device),
        weights,
        0.75,
    )


def regional(B=2, H=2, N=9, d=8, P=3, T=5, dtype=torch.float64, device="cpu", ragged=True, grad=False):
    """Arguments of regional_cross_attention (q, k, v, region_ids, kv_len, scale=None)."""
    q = torch.randn(B, H, N, d, dtype=dtype).to(device).requires_grad_(grad)
    k = torch.randn(B, P, H, T, d, dtype=dtype).to(device).requires_grad_(grad)
    v = torch.randn(B, P, H, T, d, dtype=dtype).to(device).requires_grad_(grad)
    region_ids = torch.randint(0, P, (B, N)).to(device)
    kv_len = torch.randint(1, T + 1, (B, P)).to(device) if ragged else None
    return q, k, v, region_ids, kv_len, None


def ewa(B=2, L=3, T=6, D=5, G=4, dtype=torch.float64, device="cpu", masked=True, grad=False):
    """Arguments of ewa_weights (prompt, concepts, prompt_mask); the mask pads each sample's tail."""
    prompt = torch.randn(B, L, T, D, dtype=dtype).to(device).requires_grad_(grad)
    concepts = torch.randn(L, G, D, dtype=dtype).to(device).requires_grad_(grad)
    mask = None
    if masked:
        lengths = torch.randint(1, T + 1, (B,))
        mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    return prompt, concepts, mask


def merge(B=2, G=4, r=3, Din=7, Dout=5, dtype=torch.float64, device="cpu", grad=False):
    """Arguments of ewa_merge (psi, a, b, scale)."""
    psi = torch.rand(B, G, dtype=dtype).to(device).requires_grad_(grad)
    a = torch.randn(G, r, Din, dtype=dtype).to(device).requires_grad_(grad)
    b = torch.randn(G, Dout, r, dtype=dtype).to(device).requires_grad_(grad)
    return psi, a, b, 0.5
