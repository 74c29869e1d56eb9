"""Shared plumbing of the benchmark scripts: timing, device and environment records,
JSON-lines results and the side-by-side table.

Every measurement is one JSON object on one line of ``bench/results/<device-slug>/<subject>.jsonl``
with the device, versions, git sha and command line, so a figure can always be traced back to
the run that produced it. Only measured numbers are written.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

try:
    from tqdm.auto import tqdm
except ImportError:  # a bare GPU box may lack it: no progress bar then

    def tqdm(iterable, **kwargs):
        return iterable


BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

__all__ = [
    "BENCH_DIR",
    "ROOT",
    "DeviceInfo",
    "Timing",
    "ResultWriter",
    "bench",
    "describe_device",
    "ensure_engine_importable",
    "environment",
    "format_table",
    "roofline",
    "synchronize",
    "Case",
    "Context",
    "Prepared",
    "Provider",
    "Skip",
    "compiled",
    "kernel",
    "kernel_main",
    "launcher",
    "max_err",
    "ours",
    "ours_cpu",
    "randn",
    "run_case",
    "short_error",
    "tensors",
    "upcast",
]


# ----------------------------------------------------------------------------- import


def ensure_engine_importable() -> None:
    """Make ``lifelong_engine`` (and ``lifelong_engine.kernels``) importable from a bare checkout.

    The installed package (``pip install -e .``) is used when present. Otherwise the source
    tree is put on ``sys.path`` and the top-level ``kernels/`` folder is mapped to
    ``lifelong_engine.kernels``, as the setuptools package-dir mapping does on install
    (no top-level ``kernels`` module is ever created).
    """
    if importlib.util.find_spec("lifelong_engine") is None:
        sys.path.insert(0, str(ROOT))
    import lifelong_engine

    if "lifelong_engine.kernels" in sys.modules:
        return
    try:
        importlib.import_module("lifelong_engine.kernels")
    except ModuleNotFoundError:
        folder = ROOT / "kernels"
        spec = importlib.util.spec_from_file_location(
            "lifelong_engine.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["lifelong_engine.kernels"] = module
        spec.loader.exec_module(module)
        lifelong_engine.kernels = module


# ----------------------------------------------------------------------------- device


@dataclass(frozen=True)
class DeviceInfo:
    """name: as the driver reports it; slug: folder name under bench/results/;
    peak_gbps: HBM bandwidth (GB/s); peak_tflops: dense bf16/fp16 tensor-core TFLOP/s.
    Peaks are None for devices not in the table (and for CPUs)."""

    type: str
    name: str
    slug: str
    peak_gbps: float | None
    peak_tflops: float | None

    def as_record(self) -> dict:
        return {
            "device": self.name,
            "device_type": self.type,
            "device_slug": self.slug,
            "peak_gbps": self.peak_gbps,
            "peak_tflops": self.peak_tflops,
        }


# (predicate on the device name, peak HBM GB/s, dense bf16 TFLOP/s), from NVIDIA's data sheets.
# Variants with other clocks or memory (H100 NVL, H200 NVL) are deliberately not matched.
_PEAKS: tuple[tuple[Callable[[str], bool], float, float], ...] = (
    (lambda n: "H200" in n and "NVL" not in n, 4800.0, 989.0),
    (lambda n: "H100" in n and "PCIE" in n, 2000.0, 756.0),
    (lambda n: "H100" in n and ("HBM3" in n or "SXM" in n) and "NVL" not in n, 3350.0, 989.0),
)


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def describe_device(device: torch.device) -> DeviceInfo:
    """Name, results-folder slug and roofline peaks of ``device`` (cuda or cpu)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        upper = name.upper()
        for match, gbps, tflops in _PEAKS:
            if match(upper):
                return DeviceInfo("cuda", name, slugify(name), gbps, tflops)
        return DeviceInfo("cuda", name, slugify(name), None, None)
    return DeviceInfo(device.type, _cpu_name(), slugify(device.type), None, None)


# ------------------------------------------------------------------------ environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment(argv: Sequence[str] | None = None) -> dict:
    """Versions, git sha, date and command line shared by every record of a run.

    git_sha falls back to $LIFELONG_GIT_SHA (for copies of the tree without .git), then "unknown".
    """
    sha = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if sha else None
    argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(shlex.quote(a) for a in [sys.executable, str(Path(sys.argv[0])), *argv])
    triton_version = _version("triton") or _version("pytorch-triton")
    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": triton_version,
            "diffusers": _version("diffusers"),
            "peft": _version("peft"),
            "xformers": _version("xformers"),
            "lifelong_engine": _version("lifelong-engine"),
        },
        "git_sha": sha or os.environ.get("LIFELONG_GIT_SHA") or "unknown",
        "git_dirty": None if dirty is None else bool(dirty),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "env": {k: os.environ[k] for k in ("TRITON_INTERPRET", "LIFELONG_BACKEND") if k in os.environ},
    }


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles; method says how."""

    ms: float
    ms_p20: float
    ms_p80: float
    method: str


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, in ms (host-side work; no device sync)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(
    fn: Callable[[], object], device: torch.device, *, rep_ms: float = 100.0, min_reps: int = 5, max_reps: int = 100
) -> Timing:
    """Time ``fn()``.

    CUDA: ``triton.testing.do_bench`` (flushes L2 between calls; median, p20, p80 over ~rep_ms).
    CPU: two warm-up calls (none when min_reps is 1), then calls timed with ``time.perf_counter``
    until rep_ms of total time or max_reps calls, and at least min_reps.
    """
    if device.type == "cuda":
        import triton.testing

        ms, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(ms), float(p20), float(p80), "triton.testing.do_bench")
    for _ in range(2 if min_reps > 1 else 0):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and (time.perf_counter() - start) * 1e3 < rep_ms):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if len(times) == 1:
        return Timing(times[0], times[0], times[0], "time.perf_counter")
    q = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), q[1], q[7], "time.perf_counter")


def roofline(
    ms: float, n_bytes: int | None, flops: int | None, device: DeviceInfo, dtype: torch.dtype
) -> dict[str, float | None]:
    """Achieved GB/s and TFLOP/s and their fractions of the device's peaks.

    roofline_fraction = max(bytes / peak_bw, flops / peak_flops) / time: how close the call
    comes to the time the roofline allows. The TFLOP/s peak is the bf16/fp16 tensor-core one,
    so it is used only for those dtypes.
    """
    sec = ms * 1e-3
    gbps = n_bytes / sec / 1e9 if n_bytes and sec > 0 else None
    tflops = flops / sec / 1e12 if flops and sec > 0 else None
    frac_hbm = gbps / device.peak_gbps if gbps is not None and device.peak_gbps else None
    tensor_core = dtype in (torch.float16, torch.bfloat16)
    frac_tflops = tflops / device.peak_tflops if tflops is not None and device.peak_tflops and tensor_core else None
    fractions = [f for f in (frac_hbm, frac_tflops) if f is not None]
    return {
        "gbps": gbps,
        "tflops": tflops,
        "frac_hbm": frac_hbm,
        "frac_tflops": frac_tflops,
        "roofline_fraction": max(fractions) if fractions else None,
    }


# ---------------------------------------------------------------------------- results


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    return x


def record_key(rec: dict) -> tuple:
    """What a record measures: a newer record with the same key supersedes it."""
    return rec.get("case"), rec.get("provider"), rec.get("dtype")


class ResultWriter:
    """Keeps ``<out_dir>/<subject>.jsonl``: one JSON object per line, one line per (case,
    provider, dtype). A new record replaces the file's record with the same key and leaves
    the others, so a grid can be measured in several runs (``--model``, ``--batch``, …);
    ``fresh`` empties each subject's file first instead. The file is rewritten atomically
    after every record, so a run cut short keeps what it measured."""

    def __init__(self, out_dir: Path, fresh: bool = False):
        self.out_dir = Path(out_dir)
        self.fresh = fresh
        self._records: dict[str, list[dict]] = {}
        self.paths: dict[str, Path] = {}

    def _load(self, path: Path) -> list[dict]:
        if self.fresh or not path.exists():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed run
        return records

    def write(self, record: dict) -> None:
        record = _jsonable(record)
        subject = record["subject"]
        path = self.paths.get(subject)
        if path is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.paths[subject] = self.out_dir / f"{subject}.jsonl"
            self._records[subject] = self._load(path)
        key = record_key(record)
        records = [r for r in self._records[subject] if record_key(r) != key]
        records.append(record)
        self._records[subject] = records
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, path)


# ------------------------------------------------------------------------------ table


def _cell(rec: dict, ours_ms: float | None) -> str:
    status = rec["status"]
    if status != "ok":
        return {"skipped": "skip", "incorrect": "WRONG", "error": "ERROR"}.get(status, status)
    text = f"{rec['ms']:.4g}"
    if rec.get("interpreted"):
        text += " (interp)"
    elif ours_ms and rec["provider"] != "ours":
        text += f" ({rec['ms'] / ours_ms:.2f}x)"
    return text


def format_table(records: Iterable[dict], ours: str = "ours") -> str:
    """Providers side by side, one row per case: ms per provider, and for the others the ratio
    provider_ms / ours_ms (> 1: ours is faster), plus ours' GB/s, TFLOP/s and roofline fraction.
    Skip reasons and failures are listed under the table."""
    records = list(records)
    if not records:
        return "(no records)"
    cases: dict[str, dict[str, dict]] = {}
    providers: list[str] = []
    for rec in records:
        cases.setdefault(rec["case"], {})[rec["provider"]] = rec
        if rec["provider"] not in providers:
            providers.append(rec["provider"])
    header = ["case", f"{ours} GB/s", "TFLOP/s", "roofline", *[f"{p} ms" for p in providers]]
    rows = []
    for case, by_provider in cases.items():
        mine = by_provider.get(ours)
        ours_ms = mine["ms"] if mine and mine["status"] == "ok" and not mine.get("interpreted") else None

        def fmt(key: str, spec: str, mine=mine) -> str:
            value = mine.get(key) if mine and mine["status"] == "ok" else None
            return "-" if value is None else format(value, spec)

        row = [case, fmt("gbps", ".0f"), fmt("tflops", ".1f"), fmt("roofline_fraction", ".0%")]
        row += [_cell(by_provider[p], ours_ms) if p in by_provider else "-" for p in providers]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if col == 0 else c.rjust(w) for col, (c, w) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes: dict[tuple[str, str, str], int] = {}
    for rec in records:
        if rec["status"] != "ok":
            key = (rec["status"], rec["provider"], rec.get("reason") or "")
            notes[key] = notes.get(key, 0) + 1
    for (status, provider, reason), count in notes.items():
        lines.append(f"  {provider}: {status} ({count} case{'s' if count > 1 else ''}): {reason}")
    return "\n".join(lines)


# ------------------------------------------------------------------ kernel benchmarks
# Shared by bench/regional.py, bench/lora_kv.py and bench/ewa.py: the provider / case types, the
# check against the fp32 reference, the timing of the providers that pass, and the command line.
# Every provider is first checked against the fp32 reference (lifelong_engine.reference on the same
# inputs upcast): its max abs error must be ≤ 2 × the error of the reference run in the benchmark
# dtype + rtol(dtype) × max|ref|. Only providers that pass are timed. A provider that cannot run
# here (package missing, CPU without the Triton interpreter, compile failure) is recorded as
# skipped with the reason.

TEXT_LEN = 77  # CLIP prompt length, SD-1.5 and SDXL
BATCHES = (1, 2, 8, 16)
LORA_RANK, LORA_ALPHA = 4, 8.0  # scale = alpha / rank = 2, as peft computes it
MODELS = ("sd15", "sdxl")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Correctness: |provider − ref32| ≤ 2·|ref_same_dtype − ref32| + RTOL·max|ref32|.
RTOL = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}

COMPILING = ("compile", "flex")  # providers that need a torch.compile per case


class Skip(Exception):
    """The provider cannot run here; the message says why."""


@dataclass
class Context:
    device: torch.device
    dtype: torch.dtype
    quick: bool
    interpret: bool  # TRITON_INTERPRET=1 was set before Python started

    def require_triton(self) -> None:
        """Raise Skip unless our Triton kernels can run meaningfully here."""
        if self.device.type == "cuda":
            return
        if not self.interpret:
            raise Skip("Triton kernels run on CUDA, or on CPU only with TRITON_INTERPRET=1 set before Python starts")
        if not self.quick:
            raise Skip("the Triton CPU interpreter is a correctness check, not a speed: only with --quick")
        if self.dtype == torch.bfloat16:
            raise Skip("the Triton CPU interpreter mishandles bf16 tl.dot: use --dtype fp32 or fp16")

    @property
    def interpreted(self) -> bool:
        return self.device.type == "cpu" and self.interpret


@dataclass
class Prepared:
    """call(): the timed work; canonical(out): its output in the reference's layout (untimed)."""

    call: Callable[[], Any]
    canonical: Callable[[Any], Any] = lambda out: out
    interpreted: bool = False


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[dict, Context], Prepared]  # raises Skip when it cannot run


@dataclass
class Case:
    """One shape of one subject. make(device, dtype) → inputs; reference(inputs) → outputs
    (run on the inputs upcast to fp32 for the ground truth); cost(inputs) → (bytes, flops)
    that the op must at least move and compute (the same for every provider)."""

    subject: str
    label: str
    shape: dict
    make: Callable[[torch.device, torch.dtype], dict]
    reference: Callable[[dict], Any]
    cost: Callable[[dict], tuple[int, int | None]]
    providers: list[Provider] = field(default_factory=list)


def randn(*shape: int, device, dtype, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=device) * std).to(dtype)


def upcast(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: upcast(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(upcast(v) for v in x)
    return x


def tensors(out) -> list[torch.Tensor]:
    """The output tensors in order, however nested in tuples / lists."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in tensors(o)]


def max_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in want]:
        raise ValueError(f"output shapes {[tuple(t.shape) for t in got]}; expected {[tuple(t.shape) for t in want]}")
    return max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))


def short_error(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    text = f"{type(e).__name__}: {text}" if not isinstance(e, Skip) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compiled(fn: Callable, *args) -> Prepared:
    """torch.compile(fn) (default mode, static shapes) called on args; compiled by a first call
    here, so a compiler failure becomes a Skip."""
    compiled = torch.compile(fn, dynamic=False)

    def call():
        return compiled(*args)

    try:
        call()
    except Exception as e:  # inductor raises many types (BackendCompilerFailed, CppCompileError, ...)
        raise Skip(f"torch.compile failed: {short_error(e)}") from e
    return Prepared(call)


def ours(op: Callable, *args, ctx: Context) -> Prepared:
    """The public op under use_backend("triton") (validation + dispatch + kernel)."""
    ctx.require_triton()
    from lifelong_engine import ops

    def call():
        with ops.use_backend("triton"):
            return op(*args)

    return Prepared(call, interpreted=ctx.interpreted)


def ours_cpu(op: Callable, *args, ctx: Context) -> Prepared:
    """The public op under use_backend("torch"), the fast plain-PyTorch CPU backend (validation +
    dispatch + implementation)."""
    if ctx.device.type != "cpu":
        raise Skip("the torch backend runs CPU tensors")
    from lifelong_engine import ops

    def call():
        with ops.use_backend("torch"):
            return op(*args)

    return Prepared(call)


def launcher(module: str, name: str, ctx: Context) -> Callable:
    """lifelong_engine.kernels.<module>.<name>, or Skip when it cannot run here or does not exist."""
    ctx.require_triton()
    try:
        return getattr(importlib.import_module(f"lifelong_engine.kernels.{module}"), name)
    except (ImportError, AttributeError) as e:
        raise Skip(f"lifelong_engine.kernels.{module}.{name} is not available: {short_error(e)}") from e


def kernel(module: str, name: str, *args, ctx: Context) -> Prepared:
    """The Triton launcher called directly (no validation, no dispatch): the gap to `ours` is
    the op wrapper's overhead."""
    fn = launcher(module, name, ctx)
    return Prepared(lambda: fn(*args), interpreted=ctx.interpreted)


# ------------------------------------------------------------------------------ runner


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(
    case: Case, ctx: Context, wanted: Callable[[str], bool], base: dict, info: DeviceInfo, rep_ms: float
) -> list[dict]:
    """Check every wanted provider against the fp32 reference, time those that pass; one
    record per provider."""
    from lifelong_engine.errors import BackendUnavailableError

    providers = [p for p in case.providers if wanted(p.name)]
    if any(p.name in COMPILING for p in providers):
        torch._dynamo.reset()  # static shapes: a fresh compile per case, and no recompile limit to hit
    empty = {"subject": case.subject, "case": case.label, "shape": case.shape, "provider": None, "dtype": ctx.dtype}
    empty["status"] = "ok"
    empty.update(dict.fromkeys(("reason", "correct", "max_abs_err", "tolerance", "ref_err", "bytes", "flops")))
    empty.update(dict.fromkeys(("ms", "ms_p20", "ms_p80", "timing", "gbps", "tflops", "frac_hbm", "frac_tflops")))
    empty.update(roofline_fraction=None, interpreted=False, **base)
    torch.manual_seed(0)
    try:
        inputs = case.make(ctx.device, ctx.dtype)
        want = tensors(case.reference(upcast(inputs)))
        ref_err = max_err(tensors(case.reference(inputs)), want)
        ref_max = max(t.abs().max().item() for t in want)
        n_bytes, flops = case.cost(inputs)
        synchronize(ctx.device)
    except Exception as e:  # e.g. out of memory for the fp32 reference: every provider of the case is left out
        status = "skipped" if isinstance(e, torch.cuda.OutOfMemoryError) else "error"
        reason = f"case setup (inputs, fp32 reference) failed: {short_error(e)}"
        _release(ctx.device)
        return [{**empty, "provider": p.name, "status": status, "reason": reason} for p in providers]
    tol = 2 * ref_err + RTOL[ctx.dtype] * ref_max
    records = []
    for provider in providers:
        rec = {
            **empty,
            "provider": provider.name,
            "tolerance": tol,
            "ref_err": ref_err,
            "bytes": n_bytes,
            "flops": flops,
        }
        prepared = out = None
        try:
            prepared = provider.build(inputs, ctx)
            rec["interpreted"] = prepared.interpreted
            start = time.perf_counter()
            out = prepared.call()
            synchronize(ctx.device)
            first_ms = (time.perf_counter() - start) * 1e3
            out = prepared.canonical(out)
            err = max_err(tensors(out), want)
            rec["max_abs_err"], rec["correct"] = err, err <= tol  # False for NaN
            if not rec["correct"]:
                rec["status"], rec["reason"] = "incorrect", f"max abs error {err:.3g} > tolerance {tol:.3g}"
            else:
                out = None
                if prepared.interpreted:  # the checked call's time: the interpreter's time means nothing
                    timing = Timing(first_ms, first_ms, first_ms, "time.perf_counter, one interpreted call")
                else:
                    timing = bench(prepared.call, ctx.device, rep_ms=rep_ms)
                    rec.update(roofline(timing.ms, n_bytes, flops, info, ctx.dtype))
                rec.update(ms=timing.ms, ms_p20=timing.ms_p20, ms_p80=timing.ms_p80, timing=timing.method)
        except (Skip, BackendUnavailableError, ImportError) as e:
            rec["status"], rec["reason"] = "skipped", short_error(e)
        except torch.cuda.OutOfMemoryError as e:
            rec["status"], rec["reason"] = "skipped", f"out of memory: {short_error(e, 120)}"
        except Exception as e:  # a provider that breaks is reported, and the run goes on
            rec["status"], rec["reason"] = "error", short_error(e)
        del prepared, out
        records.append(rec)
        _release(ctx.device)
    del inputs, want
    _release(ctx.device)
    return records


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


SubjectCases = Callable[[bool, set[str], set[int]], list[Case]]  # (quick, models, batches) → cases


def kernel_args(doc: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The command line every kernel benchmark script takes (doc: the script's docstring)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a handful of tiny shapes (runs on a CPU in seconds)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument(
        "--out", default=None, help="results folder (default bench/results/<device-slug>/, with --quick …/quick/)"
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--model", default="sd15,sdxl", help="comma list of sd15, sdxl (regional, lora_kv)")
    parser.add_argument("--batch", default=",".join(map(str, BATCHES)), help="comma list of batch sizes")
    parser.add_argument("--providers", default=None, help="comma list: only these providers")
    parser.add_argument(
        "--exclude",
        default="",
        help="comma list: leave these providers out (e.g. compile,flex); other scripts' names are ignored",
    )
    parser.add_argument("--rep-ms", type=float, default=None, help="timing budget per provider and case")
    parser.add_argument(
        "--fresh", action="store_true", help="empty the subjects' results files first (default: replace same cases)"
    )
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    return parser.parse_args(argv)


def kernel_main(doc: str, subjects: dict[str, tuple[SubjectCases, list[Provider]]], argv=None) -> int:
    """Run one script's subjects (subject → (cases, providers)): check and time every wanted
    provider on every case, write one JSON line per record and print the side-by-side tables;
    exit status 1 when a provider failed its check or raised."""
    args = kernel_args(doc, argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    ctx = Context(device, dtype, args.quick, os.environ.get("TRITON_INTERPRET", "0") == "1")
    models, batches = set(_csv(args.model)), {int(b) for b in _csv(args.batch)}
    only, exclude = (set(_csv(args.providers)) if args.providers else None), set(_csv(args.exclude))
    known = {p.name for _, providers in subjects.values() for p in providers}
    unknown = (only or set()) - known
    if unknown:
        raise SystemExit(f"unknown provider(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    if exclude - known:  # one --exclude serves every kernel script (bench/gpu_session.sh): not an error
        print(f"--exclude: {', '.join(sorted(exclude - known))} not among this script's providers, ignored")
    unknown = set(_csv(args.model)) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(sorted(unknown))}; known: {', '.join(MODELS)}")

    def wanted(name: str) -> bool:
        return (only is None or name in only) and name not in exclude

    cases = {subject: make_cases(args.quick, models, batches) for subject, (make_cases, _) in subjects.items()}
    if args.list:
        for subject, subject_cases in cases.items():
            print(f"{subject}: {len(subject_cases)} cases")
            for case in subject_cases:
                print(f"  {case.label}")
        return 0

    info = describe_device(device)
    default_out = BENCH_DIR / "results" / info.slug / ("quick" if args.quick else "")
    out_dir = Path(args.out) if args.out else default_out
    env = environment(sys.argv[1:] if argv is None else argv)
    base = {**info.as_record(), **env, "quick": args.quick, "run_id": f"{env['date']}-{uuid.uuid4().hex[:6]}"}
    rep_ms = args.rep_ms or (100.0 if device.type == "cuda" else (30.0 if args.quick else 500.0))
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"device: {info.name} ({info.slug}), dtype {dtype_name}, git {env['git_sha'][:12]}, results in {out_dir}")
    if ctx.interpreted:
        print("TRITON_INTERPRET=1: Triton kernels run in the CPU interpreter; their times mean nothing")

    failures = 0
    writer = ResultWriter(out_dir, fresh=args.fresh)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")  # interpreter: masked lanes
        for subject, subject_cases in cases.items():
            records = []
            for case in tqdm(subject_cases, desc=subject, unit="case", file=sys.stderr, dynamic_ncols=True):
                for rec in run_case(case, ctx, wanted, base, info, rep_ms):
                    writer.write(rec)
                    records.append(rec)
            failures += sum(r["status"] in ("incorrect", "error") for r in records)
            print(f"\n{subject} [{info.name}, {dtype_name}; ms (provider ms / ours ms)]")
            print(format_table(records))
    for path in writer.paths.values():
        print(f"wrote {path}")
    if failures:
        print(f"{failures} provider run(s) failed their correctness check or raised: see the tables above")
    return 1 if failures else 0
