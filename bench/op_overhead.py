"""Per-call cost of the public fused ops against the trusted entries the generation hot path uses.

    python bench/op_overhead.py [--calls 300]

The public ops (``ops.regional_cross_attention``, ``ops.lora_term``) check the values of their index
inputs (a device → host read) and go through torch.library's dispatch; the trusted entries the
processors call (``ops.*_trusted``) skip both, since the plan checked those values when it made them.
Tiny shapes, so the time is the per-call overhead, not the arithmetic. One thread; prints the medians.
"""

from __future__ import annotations

import argparse
import time

import common
import torch

common.ensure_engine_importable()
from lifelong_engine import ops  # noqa: E402


def median_us(fn, calls: int) -> float:
    for _ in range(30):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[calls // 2] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    calls = parser.parse_args().calls
    torch.set_num_threads(1)
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 3, 1, 4, 8)
    v, region_ids = torch.randn_like(k), torch.randint(0, 3, (1, 4), dtype=torch.int32)
    x, a, b = torch.randn(2, 4, 8), torch.randn(4, 2, 8), torch.randn(4, 8, 2)
    ids, weights = torch.tensor([[0, 1], [2, -1]]), torch.rand(2, 2)
    pairs = {
        "regional_cross_attention": (
            lambda: ops.regional_cross_attention(q, k, v, region_ids, None, 0.35),
            lambda: ops.regional_cross_attention_trusted(q, k, v, region_ids, None, 0.35),
        ),
        "lora_term": (
            lambda: ops.lora_term(x, a, b, ids, weights),
            lambda: ops.lora_term_trusted(x, a, b, ids, weights),
        ),
    }
    with torch.no_grad():
        for name, (public, trusted) in pairs.items():
            p, t = median_us(public, calls), median_us(trusted, calls)
            print(f"{name:26s} public {p:7.1f} us   trusted {t:7.1f} us   saved {p - t:6.1f} us per call")


if __name__ == "__main__":
    main()
