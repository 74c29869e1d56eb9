"""Naive loop versions of DESIGN §3, written independently of lifelong_engine.reference.

Slow and obvious on purpose: one output element (or row) at a time, straight from the
formulas. Tests compare both the reference and every backend against these.
"""

import torch

EPS = 1e-12


def lora_kv_projection(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale=1.0):
    bsz, t_len, _ = c.shape
    k = torch.empty(bsz, t_len, w_k.shape[0], dtype=c.dtype)
    v = torch.empty_like(k)
    for b in range(bsz):
        for t in range(t_len):
            x = c[b, t]
            k[b, t] = w_k @ x
            v[b, t] = w_v @ x
            for s in range(ids.shape[1]):
                n = int(ids[b, s])
                if n == -1:
                    continue
                wt = float(weights[b, s]) * scale
                k[b, t] += wt * (b_k[n] @ (a_k[n] @ x))
                v[b, t] += wt * (b_v[n] @ (a_v[n] @ x))
    return k, v


def regional_cross_attention(q, k, v, region_ids, kv_len=None, scale=None):
    bsz, heads, n_q, d = q.shape
    scale = d**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    for b in range(bsz):
        for h in range(heads):
            for n in range(n_q):
                p = int(region_ids[b, n])
                keys = k.shape[3] if kv_len is None else int(kv_len[b, p])
                scores = (k[b, p, h, :keys] @ q[b, h, n]) * scale
                probs = torch.exp(scores - scores.max())
                probs = probs / probs.sum()
                out[b, h, n] = probs @ v[b, p, h, :keys]
    return out


def _cos(x, y):
    return float(x @ y) / (max(float(x.norm()), EPS) * max(float(y.norm()), EPS))


def ewa_weights(prompt, concepts, prompt_mask=None, power=2.0, norm="fro"):
    bsz, layers, t_len, _ = prompt.shape
    n_concepts = concepts.shape[1]
    psi = torch.zeros(bsz, layers, n_concepts, dtype=prompt.dtype)
    for b in range(bsz):
        tokens = [t for t in range(t_len) if prompt_mask is None or bool(prompt_mask[b, t])]
        for layer in range(layers):
            m = [max(_cos(prompt[b, layer, t], concepts[layer, g]) for t in tokens) for g in range(n_concepts)]
            m_pow = [max(x, 0.0) ** power for x in m]  # a concept no token points towards weighs 0
            total = sum(x * x for x in m_pow) ** 0.5 if norm == "fro" else sum(abs(x) for x in m_pow)
            for g in range(n_concepts):
                psi[b, layer, g] = m_pow[g] / max(total, EPS)
    return psi


def ewa_merge(psi, a, b, scale=1.0):
    delta = torch.zeros(psi.shape[0], b.shape[1], a.shape[2], dtype=a.dtype)
    for i in range(psi.shape[0]):
        for g in range(psi.shape[1]):
            delta[i] += float(psi[i, g]) * scale * (b[g] @ a[g])
    return delta
