"""Lifelong runs on TinyWorld (tinyworld/lifelong.py), the demo and the quality benchmark's plumbing.

These use an untrained TinyWorld model and evaluator saved to a temporary directory, so they check
what is computed and written, not how good it is; test_tinyworld_quality.py checks the shipped model.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lifelong_engine import ConceptStore
from lifelong_engine.cli import main as cli_main
from lifelong_engine.tinyworld import evaluator as ev
from lifelong_engine.tinyworld import model as tm
from lifelong_engine.tinyworld.demo import run_demo
from lifelong_engine.tinyworld.lifelong import SequenceConfig, report_markdown

ROOT = Path(__file__).resolve().parents[1]
TINY = SequenceConfig(concepts=("tw-badge", "tw-flag"), images=3, steps=2, batch_size=2, samples=1,
                      inference_steps=2, pairs=1)  # fmt: skip


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tinyworld-random")
    tm.save_weights(tm.build_pipeline(tm.tinyworld_components(seed=0)), directory)
    torch.manual_seed(0)
    ev.Evaluator(ev.EvaluatorNet()).save(directory / "evaluator")
    return directory


def test_config_rejects_bad_input():
    with pytest.raises(KeyError, match="tw-nothing"):
        SequenceConfig(concepts=("tw-nothing",))
    with pytest.raises(ValueError, match="distinct"):
        SequenceConfig(concepts=("tw-badge", "tw-badge"))
    with pytest.raises(ValueError, match="pairs=2"):
        SequenceConfig(concepts=("tw-badge", "tw-flag", "tw-kite"), pairs=2)
    with pytest.raises(ValueError, match="steps"):
        SequenceConfig(steps=0)
    with pytest.raises(ValueError, match="captions 'dreambooth'"):
        SequenceConfig(captions="dreambooth")


def test_demo_writes_grid_and_reports(weights, tmp_path):
    report = run_demo(tmp_path, weights_dir=weights, config=TINY, progress=False)
    names = list(TINY.concepts)
    assert report["status"] == "finished" and list(report["concepts"]) == names
    for task, name in enumerate(names, 1):
        e = report["concepts"][name]
        assert e["task"] == task
        for stage in ("base", "after_learning", "final"):
            assert -1 <= e[stage]["ia"] <= 1 and 0 <= e[stage]["ta"] <= 1
            assert 0 <= e[stage]["recognised"] <= e[stage]["recognised_anywhere"] <= 1  # its place is one place
            assert 0 <= e[stage]["parts_anywhere"] <= 1
        assert e["forgetting"] == pytest.approx(e["after_learning"]["ia"] - e["final"]["ia"])
    s = report["summary"]
    assert s["forgetting"] == pytest.approx(report["concepts"][names[0]]["forgetting"], abs=1e-4)  # not the last
    assert s["ia_final"] == pytest.approx(np.mean([report["concepts"][n]["final"]["ia"] for n in names]), abs=1e-4)
    parts = [report["concepts"][n]["final"]["parts_anywhere"] for n in names]
    assert s["parts_anywhere_final"] == pytest.approx(np.mean(parts), abs=1e-4)
    for n in names:  # TA is the mean of each image's checks; ta_checks reads them one by one
        checks = report["concepts"][n]["final"]["ta_checks"]
        assert set(checks) <= {"background", "position", "size", "companion"} and checks
        assert all(0 <= v <= 1 for v in checks.values())
        assert min(checks.values()) - 1e-9 <= report["concepts"][n]["final"]["ta"] <= max(checks.values()) + 1e-9
    for check, value in s["ta_checks_final"].items():
        assert value == pytest.approx(np.mean([report["concepts"][n]["final"]["ta_checks"][check] for n in names]),
                                      abs=1e-4)  # fmt: skip
    (pair,) = report["pairs"]
    assert pair["concepts"] == names and all(0 <= p <= 1 for p in pair["presence"])
    ewa = report["ewa"]  # ψ and the cosines it is made of, each a mean in its range
    assert ewa["concepts"] == 2 and 0 <= ewa["argmax_rate"] <= 1 and 0 <= ewa["psi_named"] <= 1
    assert 0 <= ewa["argmax_concept_words"] <= 1 and 0 <= ewa["argmax_centred"] <= 1
    assert 1 / 2 <= ewa["argmax_most_won"] <= 1  # two concepts: the one that wins most wins at least half
    assert 0 <= ewa["argmax_without_first_word"] <= 1
    if ewa["lost_at"] is not None:  # where the other concept's match was found, one place per lost pair
        assert sum(ewa["lost_at"].values()) == pytest.approx(1.0) and min(ewa["lost_at"].values()) >= 0
    for key in ("cosine_named", "cosine_largest_other", "cosine_no_concept", "cosine_between_concepts"):
        assert -1 - 1e-5 <= ewa[key] <= 1 + 1e-5, (key, ewa[key])

    assert json.loads((tmp_path / "report.json").read_text())["summary"] == s
    md = (tmp_path / "report.md").read_text()
    assert "| cidm |" in md and "tw-flag" in md and "Wall time" in md
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > grid.height > 3 * 32  # two concept rows and a pair row, upscaled
    with ConceptStore(tmp_path / "concepts") as store:  # the learned concepts are kept
        assert sorted(r.name for r in store.list()) == sorted(names)


def test_reports_are_saved_after_every_task(weights, tmp_path):
    from lifelong_engine import LifelongPipeline
    from lifelong_engine.tinyworld.lifelong import run_sequence

    lp = LifelongPipeline.from_pipe(tm.load_tinyworld_pipeline("cpu", weights))
    seen = []
    evaluator, config = ev.Evaluator.load(weights / "evaluator"), dataclasses.replace(TINY, method="lora-m")
    run_sequence(lp, evaluator, config, run_dir=tmp_path, progress=False,
                 on_update=lambda r: seen.append(json.loads(json.dumps(r))))  # fmt: skip
    assert [list(r["concepts"]) for r in seen] == [["tw-badge"], ["tw-badge", "tw-flag"], ["tw-badge", "tw-flag"]]
    assert [r["status"] for r in seen] == ["running", "running", "finished"]
    with pytest.raises(ValueError, match="already has concepts"):
        run_sequence(lp, None, TINY, run_dir=tmp_path, progress=False)


def test_custom_diffusion_runs_are_also_evaluated_composed(weights, tmp_path):
    from lifelong_engine import LifelongPipeline
    from lifelong_engine.tinyworld.lifelong import run_sequence

    lp = LifelongPipeline.from_pipe(tm.load_tinyworld_pipeline("cpu", weights))
    evaluator = ev.Evaluator.load(weights / "evaluator")
    config = dataclasses.replace(TINY, method="custom-diffusion", pairs=0)
    report, _ = run_sequence(lp, evaluator, config, run_dir=tmp_path, progress=False)
    entries = report["concepts"].values()
    assert all(-1 <= e["final_composed"]["ia"] <= 1 and 0 <= e["final_composed"]["ta"] <= 1 for e in entries)
    s = report["summary"]
    assert s["ia_composed"] == pytest.approx(np.mean([e["final_composed"]["ia"] for e in entries]), abs=1e-4)
    # the learned (summed) concepts are back in the pipeline afterwards
    assert all(c.method == "custom-diffusion" and "composed_with" not in c.metadata for c in lp.concepts.values())
    assert "| custom-diffusion, composed |" in report_markdown([report], "t")


def test_spread_markdown_gives_mean_range_and_how_often_cidm_wins():
    from lifelong_engine.tinyworld.lifelong import spread_markdown

    def report(seed, ia, ta, forgetting, checks=None):
        summary = {"ia_final": ia, "ta_final": ta, "forgetting": forgetting, "recognised_anywhere_final": 0.1,
                   "parts_anywhere_final": None, "ta_checks_final": checks, "ta_checks_base": checks}  # fmt: skip
        return {"status": "finished", "summary": summary, "config": {"seed": seed, "concepts": ["a"], "steps": 9}}

    runs = [
        {"cidm": report(0, 0.5, 0.4, 0.0, {"size": 0.5}), "c-lora": report(0, 0.3, 0.5, 0.1)},
        {"cidm": report(1, 0.7, 0.6, 0.1, {"size": 1.0}), "c-lora": report(1, 0.4, 0.5, 0.0),
         "lwf": report(1, 0.1, 0.1, 0.1)},
    ]  # fmt: skip
    md = spread_markdown(runs, ("cidm", "c-lora", "lwf"))
    assert "over 2 seeds (0, 1): 1 concepts, 9 steps each" in md
    assert (
        "| cidm | 0.600 (0.500–0.700) | 0.500 (0.400–0.600) | 0.050 (0.000–0.100) | 0.100 (0.100–0.100) | n/a |" in md
    )
    # IA better in both seeds; TA better in one (a tie is not better); forgetting: lower is better
    assert "| c-lora | 2 of 2, +0.250 | 1 of 2, +0.000 | 1 of 2, +0.000 | 0 of 2, +0.000 | n/a |" in md
    assert "| cidm | 0.750 |" in md and "| c-lora | n/a |" in md  # size check: cidm recorded it, c-lora did not
    assert "left out: lwf." in md


def test_report_markdown_has_a_row_per_method():
    concept = {"after_learning": {"ia": 0.5, "ta": 0.5}, "final": {"ia": 0.4, "ta": 0.5}, "forgetting": 0.1}
    summary = dict.fromkeys(("ia_final", "ta_final", "forgetting", "ia_after_learning", "base_ia", "presence",
                             "both_present"), 0.25)  # fmt: skip
    reports = [{"method": m, "summary": {**summary, "forgetting": None}, "concepts": {"tw-badge": concept}}
               for m in ("cidm", "lwf")]  # fmt: skip
    md = report_markdown(reports, "t")
    assert md.count("| cidm |") == 2 and md.count("| lwf |") == 2 and "n/a" in md and "0.40 / 0.50 (+0.10)" in md


def test_cli_demo_and_quality_bench_quick(weights, tmp_path, monkeypatch):
    """The CLI entry point and bench/quality.py --quick run end to end (with tiny settings)."""
    import lifelong_engine.tinyworld.demo as demo

    monkeypatch.setattr(demo, "QUICK", TINY)
    assert cli_main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--weights", str(weights),
                     "--no-progress"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "demo" / "report.json").read_text())["environment"]["quick"] is True

    cmd = [sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--methods", "lora-m", "--steps", "1",
           "--weights", str(weights), "--out", str(tmp_path / "q"), "--device", "cpu"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "q" / "quality-quick.json").read_text())
    assert results["reports"]["lora-m"]["status"] == "finished" and "git_sha" in results
    assert "| lora-m |" in (tmp_path / "q" / "quality-quick.md").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # finished: not run again
    assert again.returncode == 0 and "skipped" in again.stdout
    # --restart runs the listed method again and keeps the other methods' reports
    path = tmp_path / "q" / "quality-quick.json"
    other = {**results["reports"]["lora-m"], "method": "finetune"}
    path.write_text(json.dumps({**results, "reports": {**results["reports"], "finetune": other}}))
    restarted = subprocess.run([*cmd, "--restart"], capture_output=True, text=True, timeout=600)
    assert restarted.returncode == 0 and "skipped" not in restarted.stdout, restarted.stderr[-2000:]
    kept = json.loads(path.read_text())["reports"]
    assert kept["finetune"] == other and kept["lora-m"]["status"] == "finished"

    # another seed goes to its own file; --spread reads the seeds' files and writes no run
    seeded = subprocess.run([*cmd, "--seed", "3"], capture_output=True, text=True, timeout=600)
    assert seeded.returncode == 0, seeded.stderr[-2000:]
    other_seed = json.loads((tmp_path / "q" / "quality-quick-seed3.json").read_text())["reports"]
    assert list(other_seed) == ["lora-m"] and other_seed["lora-m"]["config"]["seed"] == 3
    spread = [sys.executable, str(ROOT / "bench" / "quality.py"), "--spread", str(path)]
    done = subprocess.run([*spread, str(tmp_path / "q" / "quality-quick-seed3.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "q" / "quality-spread.md").read_text()
    assert "over 2 seeds (0, 3)" in table and "| lora-m |" in table and "finetune" in table  # only under seed 0
    same = subprocess.run([*spread, str(path)], capture_output=True, text=True)
    assert same.returncode == 2 and "a different seed in each" in same.stderr
    (tmp_path / "other.json").write_text(json.dumps({"results": {}}))
    foreign = subprocess.run([*spread, str(tmp_path / "other.json")], capture_output=True, text=True)
    assert foreign.returncode == 2 and "is not a quality JSON" in foreign.stderr


@pytest.mark.slow
def test_quality_bench_quick_runs_every_method_and_ablation(weights, tmp_path):
    """Every trainer method, the LoRA-C baseline and every CIDM ablation row finish a bench/quality.py --quick run
    (one training step each: about 3 minutes on this 2-core CPU)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import quality
    finally:
        sys.path.remove(str(ROOT / "bench"))
    rows = ",".join(quality.ROWS)
    cmd = [sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--methods", rows, "--steps", "1",
           "--weights", str(weights), "--out", str(tmp_path), "--device", "cpu"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-2000:]
    reports = json.loads((tmp_path / "quality-quick.json").read_text())["reports"]
    assert {r: reports[r]["status"] for r in quality.ROWS} == dict.fromkeys(quality.ROWS, "finished")
    assert reports["cidm/no-regional"]["config"]["pipeline_options"] == {"alpha": 1.0}
    assert reports["lora-c"]["config"]["method"] == "lora-m"
    assert reports["lora-c"]["config"]["pipeline_options"] == {"composition": "lora-c"}
    table = (tmp_path / "quality-quick.md").read_text()
    assert all(f"| {r} |" in table for r in quality.ROWS)


def test_guidance_bench_quick(weights, tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "guidance.py"), "--quick", "--weights", str(weights),
           "--out", str(tmp_path), "--device", "cpu"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "guidance-quick.json").read_text())
    assert set(record["results"]) == {"none", "artist", "artist+orthogonal", "artist+orthogonal+refine"}
    assert record["pairs"] == [["tw-badge", "tw-target"]] and (tmp_path / "guidance-quick.png").is_file()
    for name, r in record["results"].items():
        assert r["images"] == 2 and 0 <= r["two_or_more_objects"] <= 1 and 0 <= r["both_present"] <= 1
        assert 0 <= r["both_parts_read"] <= r["parts_read"] <= 1
        assert (r["first_step_loss_per_image"] is None) == (name == "none")
