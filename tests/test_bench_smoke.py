"""Smoke test of the kernel benchmarks (bench/regional.py, bench/lora_kv.py, bench/ewa.py over
bench/common.py): ``--quick`` runs each end to end on the CPU,
checks every provider against the fp32 reference and writes complete JSON-lines records.

The Triton providers run only under TRITON_INTERPRET=1 (as in CI), at --quick's tiny shapes,
timed once; the torch.compile / FlexAttention providers compile per case, so they have their own
(slow) test limited to one subject.
"""

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {  # script → the subjects (results files) it writes
    "regional": ("regional_cross_attention",),
    "lora_kv": ("lora_kv_projection", "lora_kv_projection_unet"),
    "ewa": ("ewa_weights", "ewa_merge"),
}
REQUIRED = ("subject", "case", "shape", "provider", "dtype", "status", "ms", "device", "git_sha", "versions")
REQUIRED += ("command", "correct", "tolerance", "gbps", "roofline_fraction")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _bench_common():
    """bench/common.py (bench/ is a folder of scripts, not a package), under a private name."""
    name = "_lifelong_bench_common"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "common.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def _run(script: str, out: Path, *args: str, timeout: float = 240) -> dict[str, list[dict]]:
    cmd = [sys.executable, str(ROOT / "bench" / f"{script}.py"), "--quick", "--device", "cpu", "--out", str(out)]
    cmd += args
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    output = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}\n{output}"
    return {path.stem: [json.loads(line) for line in path.read_text().splitlines()] for path in out.glob("*.jsonl")}


def _check_records(records: list[dict]) -> None:
    for rec in records:
        missing = [key for key in REQUIRED if key not in rec]
        assert not missing, f"{rec.get('provider')} {rec.get('case')}: missing {missing}"
        assert rec["device"] and rec["git_sha"] and rec["versions"]["torch"] == torch.__version__
        assert isinstance(rec["shape"], dict) and rec["shape"]
        assert rec["status"] in ("ok", "skipped"), f"{rec['provider']} {rec['case']}: {rec['status']}: {rec['reason']}"
        if rec["status"] == "ok":
            assert rec["correct"] is True and rec["max_abs_err"] <= rec["tolerance"]
            assert rec["ms"] > 0 and rec["ms_p20"] <= rec["ms"] <= rec["ms_p80"]
        else:
            assert rec["reason"] and rec["ms"] is None


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_run_checks_and_records_every_provider(script, tmp_path):
    results = _run(script, tmp_path, "--exclude", "compile,flex,ours_kernel")
    assert sorted(results) == sorted(SCRIPTS[script])
    for subject, records in results.items():
        _check_records(records)
        by_provider = {}
        for rec in records:
            assert rec["subject"] == subject and rec["dtype"] == "float32"
            assert rec["provider"] not in ("compile", "flex", "ours_kernel")
            by_provider.setdefault(rec["provider"], []).append(rec)
        assert all(r["status"] == "ok" for r in by_provider["reference"])
        ours = by_provider["ours_grouped" if subject == "lora_kv_projection_unet" else "ours"]
        if subject in ("regional_cross_attention", "lora_kv_projection", "ewa_merge"):  # the torch backend
            assert by_provider["ours_cpu"] and all(r["status"] == "ok" for r in by_provider["ours_cpu"])
        if INTERPRET:  # the Triton kernels themselves, in the interpreter
            assert all(r["status"] == "ok" and r["interpreted"] for r in ours)
        else:
            assert all(r["status"] == "skipped" and "TRITON_INTERPRET" in r["reason"] for r in ours)
    if script == "regional":
        regional = {r["provider"] for r in results["regional_cross_attention"] if r["status"] == "ok"}
        assert {"sdpa", "sdpa_mask", "sdpa_per_region"} <= regional
    if script == "lora_kv":
        lora = [r for r in results["lora_kv_projection"] if r["provider"] == "peft"]
        assert lora and all(r["status"] == "ok" for r in lora)  # peft is a test dependency


@pytest.mark.slow
def test_quick_run_compiled_providers(tmp_path):
    """torch.compile and FlexAttention either pass the check or are skipped with the compiler's reason."""
    results = _run("regional", tmp_path, "--providers", "reference,compile,flex")
    records = results["regional_cross_attention"]
    _check_records(records)
    assert {r["provider"] for r in records} == {"reference", "compile", "flex"}
    for rec in records:
        if rec["status"] == "skipped":
            assert rec["reason"].startswith(("torch.compile failed", "FlexAttention failed"))


def test_roofline_and_device_table():
    common = _bench_common()
    h100 = common.DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3", 3350.0, 989.0)
    r = common.roofline(1.0, int(3.35e9), int(0.5 * 989e9), h100, torch.bfloat16)
    assert r["gbps"] == pytest.approx(3350) and r["frac_hbm"] == pytest.approx(1.0)
    assert r["frac_tflops"] == pytest.approx(0.5) and r["roofline_fraction"] == pytest.approx(1.0)
    assert common.roofline(1.0, 10**9, 10**9, h100, torch.float32)["frac_tflops"] is None  # bf16/fp16 peak only
    cpu = common.describe_device(torch.device("cpu"))
    assert cpu.slug == "cpu" and cpu.peak_gbps is None
    assert common.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"

    rows = [
        {"case": "c", "provider": "ours", "status": "ok", "ms": 1.0, "gbps": 10.0},
        {"case": "c", "provider": "sdpa", "status": "ok", "ms": 3.0},
        {"case": "c", "provider": "flex", "status": "skipped", "reason": "why"},
    ]
    table = common.format_table(rows)
    assert "3 (3.00x)" in table and "skip" in table and "flex: skipped (1 case): why" in table


def test_result_writer_replaces_same_measurement(tmp_path):
    common = _bench_common()
    rec = {"subject": "s", "case": "c", "provider": "p", "dtype": torch.float32, "ms": 1.0}
    common.ResultWriter(tmp_path).write(rec)
    writer = common.ResultWriter(tmp_path)
    writer.write({**rec, "ms": 2.0})
    writer.write({**rec, "provider": "q"})
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [(r["provider"], r["ms"], r["dtype"]) for r in lines] == [("p", 2.0, "float32"), ("q", 1.0, "float32")]


TRAIN_SCRIPT = ROOT / "bench" / "train.py"
TRAIN_PROVIDERS = ("peft", "peft+ti", "engine:cidm", "engine:lora-m:frozen")


def _run_train(out: Path, *args: str) -> tuple[list[dict], str]:
    cmd = [sys.executable, str(TRAIN_SCRIPT), "--quick", "--device", "cpu", "--threads", "1", "--out", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    output = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}\n{output}"
    assert [p.name for p in out.iterdir()] == ["train.jsonl"]
    return [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()], done.stdout


def test_train_quick_run_records_every_provider(tmp_path):
    """bench/train.py --quick: both baselines and the engine (as handed over, and with a frozen base)
    train the same LoRA on the tiny model, with warm-up excluded, peak memory and engine ÷ baseline ratios."""
    records, stdout = _run_train(tmp_path, "--providers", ",".join(TRAIN_PROVIDERS))
    assert [r["provider"] for r in records] == list(TRAIN_PROVIDERS)
    for rec in records:
        missing = [k for k in ("case", "shape", "dtype", "device", "git_sha", "versions", "command") if k not in rec]
        assert not missing, f"{rec['provider']}: missing {missing}"
        assert rec["status"] == "ok", f"{rec['provider']}: {rec['status']}: {rec['reason']}"
        assert rec["subject"] == "train" and rec["quick"] and rec["dtype"] == "float32"
        assert "--quick" in rec["command"] and rec["shape"]["model"] == "tiny"
        assert rec["measured_steps"] == rec["steps"] > 0 and rec["warmup"] >= 1  # warm-up steps not timed
        assert rec["steps_per_second"] > 0 and rec["ms_p20"] <= rec["ms"] <= rec["ms_p80"]
        assert rec["lora_params"] == records[0]["lora_params"] > 0  # the same LoRA everywhere
        assert all(map(math.isfinite, (rec["first_loss"], rec["final_loss"])))
        if rec["memory_metric"].startswith("n/a"):
            assert rec["peak_memory_bytes"] is None
        else:
            assert rec["peak_memory_bytes"] >= rec["start_memory_bytes"] > 0
    by = {r["provider"]: r for r in records}
    assert by["peft"]["token_params"] == 0 and by["peft+ti"]["token_params"] > 0
    # the trainer freezes the base model itself, whether or not the pipeline came frozen
    assert by["engine:cidm"]["base_requires_grad"] and by["engine:cidm"]["base_grads_computed"] == 0
    frozen = by["engine:lora-m:frozen"]
    assert not frozen["base_requires_grad"] and frozen["base_grads_computed"] == 0
    for name in ("engine:cidm", "engine:lora-m:frozen"):
        ratio = by[name]["speed_vs_peft"]
        assert ratio == pytest.approx(by[name]["steps_per_second"] / by["peft"]["steps_per_second"])
    assert "speed vs peft" in stdout and "engine:cidm" in stdout


def test_train_rounds_pool_every_round_of_every_provider(tmp_path):
    """--rounds 2: each provider runs twice, interleaved; its record pools both rounds' steps and keeps each
    round's median."""
    records, stdout = _run_train(tmp_path, "--rounds", "2", "--providers", "peft,engine:lora-m:frozen")
    assert [r["provider"] for r in records] == ["peft", "engine:lora-m:frozen"] and "2 rounds" in stdout
    for rec in records:
        assert rec["status"] == "ok" and rec["rounds"] == 2 and len(rec["round_ms"]) == 2
        assert rec["measured_steps"] == len(rec["step_ms"]) == 2 * rec["steps"]
        assert rec["ms"] == pytest.approx(statistics.median(rec["step_ms"]))
    engine = records[1]
    assert engine["speed_vs_peft"] == pytest.approx(engine["steps_per_second"] / records[0]["steps_per_second"])


def test_train_profile_writes_a_summary_per_run_away_from_the_clean_records(tmp_path):
    """--profile: the measured steps run under torch.profiler; each run gets a summary (ops per step and
    the op table), and the inflated records go to profile/, never beside the clean ones."""
    cmd = [sys.executable, str(TRAIN_SCRIPT), "--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]
    cmd += ["--profile", "--providers", "peft,engine:lora-m:frozen"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    assert [p.name for p in tmp_path.iterdir()] == ["profile"]
    names = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert names == ["profile-b1-engine-lora-m-frozen.txt", "profile-b1-peft.txt", "train.jsonl"]
    records = [json.loads(line) for line in (tmp_path / "profile" / "train.jsonl").read_text().splitlines()]
    assert [(r["provider"], r["status"], r["profiled"]) for r in records] == [
        ("peft", "ok", True),
        ("engine:lora-m:frozen", "ok", True),
    ]
    for name in names[:2]:
        text = (tmp_path / "profile" / name).read_text()
        ops = int(text.split("ATen ops per step: ")[1].split()[0])
        assert ops > 100, text[:500]  # a UNet step is hundreds of ops: the steps were recorded
        assert "aten::" in text and "Self CPU" in text


@pytest.mark.slow
def test_train_quick_run_bf16_autocast(tmp_path):
    """bf16 base weights with every forward under bf16 autocast (the engine's mixed_precision="bf16")."""
    records, _ = _run_train(tmp_path, "--dtype", "bf16", "--autocast", "--providers", "peft,engine:lora-m:frozen")
    assert [r["provider"] for r in records] == ["peft", "engine:lora-m:frozen"]
    for rec in records:
        assert rec["status"] == "ok", f"{rec['provider']}: {rec['status']}: {rec['reason']}"
        assert rec["dtype"] == "bfloat16" and rec["autocast"] and rec["case"].endswith(" autocast")
        assert rec["lora_params"] == records[0]["lora_params"] and math.isfinite(rec["final_loss"])


@pytest.mark.skipif(
    not (ROOT / "lifelong_engine" / "tinyworld" / "weights" / "tinyworld.json").is_file(),
    reason="needs the shipped TinyWorld weights",
)
def test_serve_runs_both_providers(tmp_path):
    """bench/serve.py on TinyWorld: the Engine and the diffusers + peft baseline serve the same requests."""
    cmd = [sys.executable, str(ROOT / "bench" / "serve.py"), "--device", "cpu", "--requests", "3", "--concepts", "2",
           "--steps", "2", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "serve.jsonl").read_text().splitlines()]
    assert [r["provider"] for r in records] == ["engine", "diffusers+peft"]
    for rec in records:
        assert rec["images_per_second"] > 0 and 0 < rec["p50_s"] <= rec["p95_s"] and rec["switch_ms"] >= 0
        assert rec["requests"] == 3 and rec["git_sha"] and rec["bytes_per_concept_device"] > 0
    assert records[0]["speedup_vs_baseline"] > 0 and records[1]["load_all_s"] > 0
