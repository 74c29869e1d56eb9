"""Trainer input and checkpoint boundaries (issue 13, row 14): NaN images, bad learning rates,
decompression bombs, truncated or mismatched checkpoints give clear errors naming what is wrong."""

import struct
import zlib

import pytest
import torch
from test_trainer import CONCEPTS, images, new_pipeline, trainer

from lifelong_engine import cli
from lifelong_engine.training import TrainingError


@pytest.fixture(scope="module")
def lp():
    return new_pipeline()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_image_tensor_is_refused(tmp_path, lp, value):
    pixels = torch.rand(2, 3, 16, 16)
    pixels[1] = value
    with pytest.raises(ValueError, match="finite"):
        trainer(lp, tmp_path, "lora-m").learn("x1", pixels, "circle")


@pytest.mark.parametrize("option", ["learning_rate", "token_learning_rate"])
@pytest.mark.parametrize("value", [-1.0, 0.0, float("nan"), float("inf")])
def test_learning_rate_must_be_finite_and_positive(tmp_path, lp, option, value):
    with pytest.raises(ValueError, match=option):
        trainer(lp, tmp_path, "lora-m", **{option: value})


def _png_header_only(path, width, height):
    """A PNG that declares width x height (the IHDR) with no real pixel data: PIL's bomb check
    reads only the header, so this costs nothing to write."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_a_clear_error(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images(CONCEPTS[0], n=2)):
        im.save(folder / f"{i}.png")
    bomb = folder / "huge.png"
    _png_header_only(bomb, 20000, 20000)  # 400 Mpx
    with pytest.raises(ValueError, match="huge.png") as info:
        trainer(new_pipeline(), tmp_path / "run", "lora-m").learn("x1", folder, "circle")
    assert "400000000 pixels" in str(info.value)
    args = ["learn", "x1", str(folder), "--class-word", "circle", "--store", str(tmp_path / "s"), "--no-progress"]
    assert cli.main([*args, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "huge.png" in err, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The checkpoint a rank-2 run killed after its first checkpoint leaves (``lora-m-<name>.ckpt``)."""
    run_dir = tmp_path_factory.mktemp("interrupted")
    tr = trainer(new_pipeline(), run_dir, "lora-m", max_steps=4, checkpoint_every=2, rank=2)
    real, calls = tr._step, []

    def crash_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    tr._step = crash_on_third
    with pytest.raises(KeyboardInterrupt):
        tr.learn(CONCEPTS[0], images(CONCEPTS[0]), "circle")
    ckpt = run_dir / f"lora-m-{CONCEPTS[0]}.ckpt"
    assert ckpt.exists()
    return ckpt.read_bytes()


def _resume(lp, tmp_path, data, rank):
    ckpt = tmp_path / f"lora-m-{CONCEPTS[0]}.ckpt"
    ckpt.write_bytes(data)
    with pytest.raises(TrainingError, match="checkpoint") as info:
        trainer(lp, tmp_path, "lora-m", rank=rank).learn(CONCEPTS[0], images(CONCEPTS[0]), "circle", resume=True)
    assert str(ckpt) in str(info.value) and "delete it" in str(info.value)
    assert CONCEPTS[0] not in lp.concepts
    return str(info.value)


def test_truncated_checkpoint_names_the_checkpoint(tmp_path, lp, checkpoint):
    _resume(lp, tmp_path, checkpoint[:1000], rank=2)


def test_resume_with_another_rank_names_the_checkpoint(tmp_path, lp, checkpoint):
    assert "shape" in _resume(lp, tmp_path, checkpoint, rank=3)


def test_fifo_among_the_images_does_not_hang(tmp_path, lp):
    import os
    import threading

    folder = tmp_path / "imgs"
    folder.mkdir()
    images(CONCEPTS[0], n=1)[0].save(folder / "0.png")
    os.mkfifo(folder / "1.png")
    outcome = []

    def load():
        try:
            trainer(lp, tmp_path / "run", "lora-m")._load_images(folder)
        except ValueError as e:
            outcome.append(str(e))

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():  # unblock the reader so the test ends, then fail
        os.close(os.open(folder / "1.png", os.O_WRONLY | os.O_NONBLOCK))
        t.join()
        pytest.fail("loading the images blocked on a FIFO")
    assert outcome and "1.png" in outcome[0] and "not a regular file" in outcome[0]


def test_truncated_method_state_names_the_file(tmp_path, lp):
    state = tmp_path / "lora-m-trainer-state.pt"
    state.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(TrainingError, match="trainer state") as info:
        trainer(lp, tmp_path, "lora-m")
    assert str(state) in str(info.value)
