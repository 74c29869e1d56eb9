"""Compile every Triton kernel for sm_90 (H100 / H200) on a machine without a GPU, and report
what the compiler made of it: registers, shared memory, stack (spill) bytes, and whether the
global loads are 16-byte vectors and copied asynchronously.

    python bench/aot_sm90.py [--models sd15,sdxl] [--dtypes fp16,bf16,fp32] [--ops regional,lora_kv,ewa]
                             [--json out/aot_sm90.json] [--check] [--jobs 2]

How. The REAL launchers of :mod:`lifelong_engine.kernels` run on CPU tensors shaped like the
SD-1.5 / SDXL layers. Two things make that compile instead of fail:
  * a fake driver (:class:`Sm90Driver`), set as Triton's active driver, answers the three
    questions ``JITFunction.run`` asks before compiling: the current device, stream and target
    (``GPUTarget("cuda", 90, 32)``). The NVIDIA backend needs nothing else to compile: ptxas
    ships with Triton's wheel, and no CUDA driver library is loaded.
  * ``JITFunction.run`` is wrapped so that every launch becomes a warm-up (``warmup=True``, the
    compile-only path Triton already has), and the compiled kernel is recorded. Nothing runs,
    so the outputs the launchers return are garbage; only the compiled kernels are read.
Both hooks exist unchanged from Triton 3.2 to 3.9 (``triton.runtime.driver.driver.set_active``,
``JITFunction.run(*args, grid, warmup, **kwargs)``), and they are undone on exit.

Read from each compiled kernel: registers and stack frame from ``cuobjdump -res-usage`` on its
cubin (a Triton kernel has no local arrays, so its stack frame is register spill), shared
memory from Triton's metadata, and from its PTX the count of 16-byte global loads
(``ld.global.v4.b32`` / ``.v2.b64`` forms and 16-byte ``cp.async`` copies), of narrower
ones (both kinds), and of ``cp.async`` copies (global → shared without registers).
Counts are of PTX instructions (per thread, loop bodies once), not of bytes moved.

--check fails (exit 1) on a compile error, on shared memory above sm_90's 227 KiB, or on a
stack frame above the kernel's threshold in ``SPILL_LIMITS`` (0 for kernels not named there).
TRITON_INTERPRET must not be set (the kernels would be interpreted, not compiled): run as a
script, it clears it for its own process; imported, compile_only() refuses to start under it.
Triton's cache goes to a temporary folder removed at exit (or --cache-dir).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # as a script, before triton is imported: compile, not interpret
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9 warns when unset; 1 = the default so far

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

SM90_MAX_SHARED = 232448  # bytes of shared memory one block may take on sm_90 (227 KiB)

# Stack-frame (spill) bytes allowed per kernel and dtype class before --check fails: 0 wherever
# the fixed kernels compile without spills (Triton 3.9 and 3.6, see README); the regional fp32
# kernels keep spills at d = 160 (fwd 176-184 B, bwd 1,056 B on 3.9; 3.2 spills 80-96 B in the
# fp32 forward at d = 40), whose 3xTF32 dots hold hi/lo parts of 16 x 256 fp32 tiles already
# at tl.dot's minimum tile sizes. A new spill anywhere else fails CI (ewa_official's _rows_kernel
# included: 0 B at both models' shapes in every dtype).
SPILL_LIMITS = {
    "_regional_attn_fwd_kernel": {"half": 0, "fp32": 192},
    "_regional_attn_bwd_kernel": {"half": 0, "fp32": 1088},
}
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


# ------------------------------------------------------------------------- fake driver


class Sm90Driver:
    """The part of a Triton driver that compiling needs: JITFunction.run asks the active driver
    for the current device and stream (cache keys here) and the target to compile for. Anything
    else (loading a module, launching) would need a GPU and is never reached, because every
    launch is turned into a warm-up."""

    def __init__(self, arch: int = 90):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


@dataclass
class Compiled:
    kernel: str
    case: str
    dtype: str
    constants: str
    num_warps: int
    num_stages: int
    registers: int
    stack: int
    shared: int
    ld_v4: int
    ld_narrow: int
    cp_async: int
    error: str = ""
    hash: str = ""


@contextlib.contextmanager
def compile_only(arch: int = 90) -> Iterator[list]:
    """Within: Triton compiles for sm_<arch> without a GPU, and every kernel launch only
    compiles; yields the list that receives (JITFunction, CompiledKernel) of each launch."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreted, there is nothing to compile")
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    records: list = []
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        records.append((self, kernel))
        return kernel

    # The driver to restore: Triton 3.9 keeps it in _active (None until first used; reading
    # .active would look for a real GPU), 3.2's .active is a lazy proxy that looks for nothing.
    previous = driver._active if hasattr(driver, "_active") else driver.active
    driver.set_active(Sm90Driver(arch))
    JITFunction.run = compile_instead
    try:
        yield records
    finally:
        JITFunction.run = run
        driver.set_active(previous)


# ------------------------------------------------------------------------- resources


def _tool(name: str) -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    found = str(bundled) if bundled.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found (neither in Triton's wheel at {bundled} nor on PATH)")
    return found


def resources(kernel) -> dict:
    """Registers and stack bytes of the cubin (cuobjdump -res-usage), shared memory (Triton's
    metadata), and global-load forms counted in the PTX."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if usage is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no REG/STACK line:\n{text}")
    ptx = kernel.asm["ptx"]
    # e.g. "@%p1 ld.global.v4.b32 {...}, [...]", "ld.global.L1::evict_last.b16 %rs1, [...]"
    loads = re.findall(r"ld\.global(?:\.(?!v[248]\.)[a-zA-Z0-9_:]+)*?\.(v[248]\.)?([bfsu]\d+)\s", ptx)
    bits = [int(vec[1] if vec else 1) * int(ty[1:]) for vec, ty in loads]
    # e.g. "cp.async.cg.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x10, %r2;" (bytes third)
    copies = [
        int(n, 0) for n in re.findall(r"cp\.async\.c[ag]\.shared\.global[^,]*,[^,]*,\s*(0x[0-9a-fA-F]+|\d+)", ptx)
    ]
    wide = sum(b >= 128 for b in bits) + sum(n >= 16 for n in copies)
    return dict(
        registers=int(usage[1]),
        stack=int(usage[2]),
        shared=int(kernel.metadata.shared),
        ld_v4=wide,
        ld_narrow=len(bits) + len(copies) - wide,
        cp_async=len(copies),
    )


# ------------------------------------------------------------------------------- cases

# (name, heads, queries, head dim) of the distinct cross-attention layers, and the text width
# and K/V widths of their projections.
MODELS = {
    "sd15": dict(
        attn=[("4096q", 8, 4096, 40), ("1024q", 8, 1024, 80), ("256q", 8, 256, 160), ("64q", 8, 64, 160)],
        din=768,
        douts=(320, 640, 1280),
    ),
    "sdxl": dict(attn=[("4096q", 10, 4096, 64), ("1024q", 20, 1024, 64)], din=2048, douts=(640, 1280)),
}
BATCH, TOKENS, SLOTS, RANK, POOL, CONCEPTS, EWA_LAYERS = 2, 77, 5, 4, 16, 1000, 16
EWA_ROWS = 4  # token rows per concept of the released code's EWA (kernels/ewa_official.py)


def _cases(model: str, dtype) -> dict[str, Callable[[], None]]:
    """name → a call of the real launchers at this model's shapes (CPU tensors)."""
    import torch
    from lifelong_engine.kernels import ewa, ewa_official, lora_kv, regional_attention

    spec = MODELS[model]
    cases: dict[str, Callable[[], None]] = {}

    def regional(heads, n_q, d):
        q = torch.randn(BATCH, heads, n_q, d, dtype=dtype)
        k = torch.randn(BATCH, SLOTS, heads, TOKENS, d, dtype=dtype)
        v = torch.randn_like(k)
        rid = torch.randint(0, SLOTS, (BATCH, n_q))
        regional_attention.regional_cross_attention(q, k, v, rid)
        regional_attention.regional_cross_attention_backward(torch.randn_like(q), q, k, v, rid)

    for name, heads, n_q, d in spec["attn"]:
        cases[f"regional {name} d={d}"] = lambda h=heads, n=n_q, d=d: regional(h, n, d)

    def lora(din, dout):
        c = torch.randn(BATCH, TOKENS, din, dtype=dtype)
        w = [torch.randn(dout, din, dtype=dtype) for _ in range(2)]
        a = [torch.randn(POOL, RANK, din, dtype=dtype) for _ in range(2)]
        b = [torch.randn(POOL, dout, RANK, dtype=dtype) for _ in range(2)]
        ids = torch.randint(0, POOL, (BATCH, 4))
        wts = torch.rand(BATCH, 4)
        args = (c, w[0], w[1], a[0], b[0], a[1], b[1], ids, wts, 2.0)
        lora_kv.lora_kv_projection(*args)
        g = torch.randn(BATCH, TOKENS, dout, dtype=dtype)
        lora_kv.lora_kv_projection_backward(g, g, *args)

    for dout in spec["douts"]:
        cases[f"lora_kv {spec['din']}->{dout}"] = lambda o=dout: lora(spec["din"], o)

    def ewa_ops():
        prompt = torch.randn(BATCH, EWA_LAYERS, TOKENS, spec["din"], dtype=dtype)
        concepts = torch.randn(EWA_LAYERS, CONCEPTS, spec["din"], dtype=dtype)
        psi = ewa.ewa_weights(prompt, concepts, torch.ones(BATCH, TOKENS, dtype=torch.bool))
        dout = spec["douts"][-1]
        a = torch.randn(CONCEPTS, RANK, spec["din"], dtype=dtype)
        b = torch.randn(CONCEPTS, dout, RANK, dtype=dtype)
        ewa.ewa_merge(psi[:, 0], a, b, 2.0)

    cases[f"ewa G={CONCEPTS}"] = ewa_ops

    def ewa_rows():
        prompt = torch.randn(BATCH, EWA_LAYERS, TOKENS, spec["din"], dtype=dtype)
        concepts = torch.randn(EWA_LAYERS, CONCEPTS, EWA_ROWS, spec["din"], dtype=dtype)
        rows = torch.rand(CONCEPTS, EWA_ROWS) < 0.75
        ewa_official.ewa_weights_rows(prompt, concepts, rows, torch.ones(BATCH, TOKENS, dtype=torch.bool))

    cases[f"ewa_rows G={CONCEPTS} W={EWA_ROWS}"] = ewa_rows
    return cases


def compile_case(job: tuple[str, str, str]) -> list[dict]:
    """Compile one (model, dtype, case) and return one row per kernel compiled."""
    import torch

    model, dtype_name, case = job
    dtype = getattr(torch, DTYPES[dtype_name])
    rows = []
    with compile_only() as records:
        try:
            _cases(model, dtype)[case]()
        except Exception as e:  # a compile error: reported as a row, fails --check
            rows.append(asdict(Compiled("?", f"{model} {case}", dtype_name, "", 0, 0, 0, 0, 0, 0, 0, 0, _short(e))))
    seen = set()
    for fn, kernel in records:
        if kernel is None or kernel.hash in seen:
            continue
        seen.add(kernel.hash)
        consts = {k if isinstance(k, str) else fn.arg_names[k[0]]: v for k, v in kernel.src.constants.items()}
        shown = ",".join(f"{k}={v}" for k, v in consts.items() if k.isupper() and not isinstance(v, str))
        rows.append(
            asdict(
                Compiled(
                    fn.__name__,
                    f"{model} {case}",
                    dtype_name,
                    shown,
                    kernel.metadata.num_warps,
                    kernel.metadata.num_stages,
                    **resources(kernel),
                    hash=kernel.hash,
                )
            )
        )
    return rows


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) < 400 else text[:400] + " …"


def check(rows: list[dict]) -> list[str]:
    """What --check fails on: compile errors, shared memory over sm_90's limit, spills over
    the kernel's threshold."""
    problems = []
    for r in rows:
        where = f"{r['kernel']} [{r['case']} {r['dtype']} {r['constants']}]"
        if r["error"]:
            problems.append(f"{where}: {r['error']}")
            continue
        if r["shared"] > SM90_MAX_SHARED:
            problems.append(f"{where}: {r['shared']} B shared memory > {SM90_MAX_SHARED}")
        kind = "fp32" if r["dtype"] == "fp32" else "half"
        limit = SPILL_LIMITS.get(r["kernel"], {}).get(kind, 0)
        if r["stack"] > limit:
            problems.append(f"{where}: {r['stack']} B stack (spills) > {limit}")
    return problems


def table(rows: list[dict]) -> str:
    head = ["kernel", "case", "dtype", "warps", "stages", "regs", "stack", "smem KB", "ld16B", "ld<16B", "cp.async"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['kernel']} | {r['case']} | {r['dtype']} | ERROR: {r['error'][:120]} |")
            continue
        cells = [
            r["kernel"].removeprefix("_").removesuffix("_kernel"),
            r["case"],
            r["dtype"],
            r["num_warps"],
            r["num_stages"],
            r["registers"],
            r["stack"],
            f"{r['shared'] / 1024:.0f}",
            r["ld_v4"],
            r["ld_narrow"],
            r["cp_async"],
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32")
    parser.add_argument("--ops", default="regional,lora_kv,ewa", help="case-name prefixes to compile")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--check", action="store_true", help="exit 1 on compile errors, smem or spills over limits")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--cache-dir", type=Path, help="Triton cache (default: a temporary folder, removed)")
    args = parser.parse_args(argv)

    import torch
    from tqdm import tqdm

    jobs = []
    for model in args.models.split(","):
        if model not in MODELS:
            parser.error(f"--models: unknown model {model!r}; expected some of {sorted(MODELS)}")
        for dt in args.dtypes.split(","):
            if dt not in DTYPES:
                parser.error(f"--dtypes: unknown dtype {dt!r}; expected some of {sorted(DTYPES)}")
            for case in _cases(model, torch.float16):
                if any(case.startswith(op) for op in args.ops.split(",")):
                    jobs.append((model, dt, case))
    if not jobs:
        parser.error("no case matches --models / --dtypes / --ops")

    tmp = None if args.cache_dir else tempfile.mkdtemp(prefix="aot-sm90-")
    os.environ["TRITON_CACHE_DIR"] = str(args.cache_dir or tmp)
    t0 = time.perf_counter()
    rows: list[dict] = []
    hashes = set()  # one row per distinct binary (its first case); layers of one shape class share it
    try:
        with ProcessPoolExecutor(max(1, args.jobs)) as pool:
            for got in tqdm(pool.map(compile_case, jobs), total=len(jobs), desc="compile sm_90", file=sys.stderr):
                rows += [r for r in got if not r["hash"] or r["hash"] not in hashes]
                hashes |= {r["hash"] for r in got}
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - t0

    import triton

    print(table(rows))
    print(
        f"\n{len(rows)} distinct kernels from {len(jobs)} cases in {elapsed:.0f} s",
        f"(triton {triton.__version__}, sm_90)",
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(triton=triton.__version__, torch=torch.__version__, seconds=round(elapsed, 1))
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    problems = check(rows)
    for p in problems:
        print("FAIL", p, file=sys.stderr)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
