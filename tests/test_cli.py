"""The `lifelong-engine` commands: `concepts` on a real store; `learn` and `generate` on an untrained
TinyWorld model (they check what is done and written, not image quality)."""

import pytest
from concept_factory import make_adapter
from PIL import Image
from test_formats import base_unet, kohya_file  # noqa: F401  (fixture and file maker)

from lifelong_engine import cli
from lifelong_engine.store import ConceptStore


def test_concepts_commands(tmp_path, capsys, base_unet):  # noqa: F811
    store = str(tmp_path / "store")
    src = kohya_file(base_unet, tmp_path / "k.safetensors")
    assert cli.main(["concepts", "import", str(src), "--store", store, "--name", "mug", "--class-word", "mug"]) == 0
    with ConceptStore(store) as s:
        s.save(make_adapter("my-dog"), namespace="alice")
    assert cli.main(["concepts", "list", "--store", store]) == 0
    out = capsys.readouterr().out
    assert "mug" in out and "alice" in out and "imported-lora" in out
    assert cli.main(["concepts", "export", "mug", "--store", store, "--out", str(tmp_path / "o.safetensors")]) == 0
    assert (tmp_path / "o.safetensors").exists()
    assert cli.main(["concepts", "verify", "--store", store]) == 0
    assert "2 concept versions checked, 0 problems" in capsys.readouterr().out
    assert cli.main(["concepts", "delete", "my-dog", "--namespace", "alice", "--store", store]) == 0
    assert cli.main(["concepts", "prune", "--store", store]) == 0


def test_concepts_errors_are_one_line(tmp_path, capsys):
    store = str(tmp_path / "store")
    assert cli.main(["concepts", "delete", "ghost", "--store", store]) == 2
    assert "error: concept default/ghost is not in the store" in capsys.readouterr().err
    with ConceptStore(store) as s:
        s.save(make_adapter("my-dog"))
        (s.root / s.record("my-dog").file).write_bytes(b"broken")
    assert cli.main(["concepts", "verify", "--store", store]) == 1
    assert "my-dog" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["concepts", "list"])  # --store is required


@pytest.fixture(scope="module")
def tinyworld(tmp_path_factory):
    from lifelong_engine.tinyworld import get_concept
    from lifelong_engine.tinyworld import model as tm

    root = tmp_path_factory.mktemp("tinyworld")
    tm.save_weights(tm.build_pipeline(tm.tinyworld_components(seed=0)), root / "weights")
    for name in ("tw-badge", "tw-flag"):
        (root / name).mkdir()
        for i, sample in enumerate(get_concept(name).images(3)):
            sample.image.save(root / name / f"{i}.png")
    return root


def test_learn_then_generate(tinyworld, tmp_path, capsys):
    common = ["--weights", str(tinyworld / "weights"), "--device", "cpu", "--no-progress"]
    store = str(tmp_path / "store")
    for name, word in (("badge", "circle"), ("flag", "square")):
        folder = str(tinyworld / f"tw-{name}")
        args = ["learn", name, folder, "--class-word", word, "--store", store, "--steps", "2", *common]
        assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "learned <badge> (cidm, 2 steps" in out and "saved as default/badge v1" in out
    assert "learned <flag>" in out and "with 1 earlier concepts frozen" in out
    with ConceptStore(store) as s:
        assert {r.name: r.method for r in s.list()} == {"badge": "cidm", "flag": "cidm"}

    image = tmp_path / "img" / "a.png"
    args = ["generate", "a <badge> circle and a <flag> square", "--store", store, "--steps", "2", "--num-images", "2",
            "--scale", "2", "--out", str(image), "--attention-guidance", "--orthogonal", "1", *common]  # fmt: skip
    assert cli.main(args) == 0
    assert "concepts: badge, flag" in capsys.readouterr().out
    for i in range(2):
        assert Image.open(image.with_stem(f"a-{i}")).size == (64, 64)  # 32² upscaled twice
    region = ["--region", "a <badge> circle@0,0,0.5,1", "--region", "a <flag> square@0.5,0,1,1"]
    args = ["generate", "two things", "--store", store, "--concepts", "flag,badge", "--steps", "2", *region,
            "--out", str(image), *common]  # fmt: skip
    assert cli.main(args) == 0 and Image.open(image).size == (32, 32)


def test_learn_and_generate_errors(tinyworld, tmp_path, capsys):
    common = ["--weights", str(tinyworld / "weights"), "--device", "cpu", "--no-progress"]
    store = str(tmp_path / "store")
    assert cli.main(["generate", "a <ghost> dog", "--store", store, "--concepts", "ghost", *common]) == 2
    assert "no concept ['ghost']" in capsys.readouterr().err
    assert cli.main(["generate", "a <ghost> dog", *common]) == 2
    assert "unknown concept token '<ghost>'" in capsys.readouterr().err
    assert cli.main(["learn", "x", str(tmp_path / "nothing"), "--class-word", "dog", "--store", store, *common]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit):
        cli.main(["generate", "p", "--region", "no box here", *common])


def test_generate_on_a_diffusers_directory(tmp_path, capsys):
    from tiny_pipes import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(tmp_path / "model")
    common = ["--device", "cpu", "--no-progress", "--steps", "2"]
    out = tmp_path / "x.png"
    assert cli.main(["generate", "a dog", "--model", str(tmp_path / "model"), "--out", str(out), *common]) == 0
    assert Image.open(out).size == (16, 16)  # the tiny pipeline's default size
    capsys.readouterr()
    assert cli.main(["generate", "a dog", "--model", str(tmp_path / "missing"), *common]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("error", [ValueError("first line\n  second line\n"), OSError()])
def test_errors_are_printed_on_one_line(tmp_path, capsys, monkeypatch, error):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_concepts_list", fail)
    assert cli.main(["concepts", "list", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and err.strip() != "error:", err
