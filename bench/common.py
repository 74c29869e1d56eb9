"""Shared plumbing of the benchmark scripts: timing, device and environment records,
JSON-lines results and the side-by-side table.

Every measurement is one JSON object on one line of ``bench/results/<device-slug>/<subject>.jsonl``
with the device, versions, git sha and command line, so a figure can always be traced back to
the run that produced it. Only measured numbers are written.
"""

from __future__ import annotations

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

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
