"""A corpus of hostile LoRA / embedding files, generated (no binaries in the repository).

Each entry is a file the importer must refuse with a ValueError that names the file and the problem
(``import_lora``), and that ``lifelong-engine concepts import`` reports as one ``error:`` line with
exit status 2. ``python tests/hostile_files.py OUT_DIR`` writes the corpus to a directory to try by hand.
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import safetensors.torch
import torch

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2"


def peft(rank: int = 2, dtype=torch.float32, projs=("to_k", "to_v"), din: int = 24, dout: int = 32) -> dict:
    """A small diffusers/peft LoRA state dict."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for proj in projs:
        sd[f"{LAYER}.{proj}.lora_A.weight"] = torch.randn(rank, din, generator=g).to(dtype)
        sd[f"{LAYER}.{proj}.lora_B.weight"] = torch.randn(dout, rank, generator=g).to(dtype)
    return sd


def kohya(alpha=None) -> dict:
    """A small kohya LoRA state dict (to_k and to_v), with ``alpha`` as its ``.alpha`` tensors if given."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for proj in ("to_k", "to_v"):
        sd[f"{KOHYA}_{proj}.lora_down.weight"] = torch.randn(2, 24, generator=g)
        sd[f"{KOHYA}_{proj}.lora_up.weight"] = torch.randn(32, 2, generator=g)
        if alpha is not None:
            sd[f"{KOHYA}_{proj}.alpha"] = alpha.clone()
    return sd


def _zip_bomb(path: Path) -> None:
    """A torch zip file whose one tensor record is deflated: 16 MiB of zeros declared in a few KiB
    (the shape of a 2 GB bomb, kept small enough for CI)."""
    buf = io.BytesIO()
    torch.save({"<bomb>": torch.zeros(1, 4 * 2**20)}, buf)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    path.write_bytes(out.getvalue())


def _safetensors(sd: dict):
    return lambda path: safetensors.torch.save_file(sd, path)


def _torch(obj, **kw):
    return lambda path: torch.save(obj, path, **kw)


def _bytes(data: bytes):
    return lambda path: path.write_bytes(data)


def _nan() -> dict:
    sd = peft()
    sd[f"{LAYER}.to_k.lora_B.weight"][0, 0] = float("nan")
    return sd


def _scalar_a() -> dict:
    sd = peft()
    sd[f"{LAYER}.to_k.lora_A.weight"] = torch.tensor(1.0)
    return sd


def _ranks_disagree() -> dict:
    sd = peft()
    sd[f"{LAYER}.to_k.lora_B.weight"] = torch.randn(32, 3)
    return sd


def _huge_values() -> dict:
    sd = peft()
    sd[f"{LAYER}.to_v.lora_B.weight"] *= 1e20  # finite in float32, but B·A overflows the attention
    return sd


def _truncated() -> bytes:
    data = safetensors.torch.save(peft())
    return data[: len(data) // 2]


# name → (writer, what the error message must say besides the file name)
CORPUS = {
    "zip-bomb.pt": (_zip_bomb, "compressed"),
    "rank-0.safetensors": (_safetensors(peft(rank=0)), "rank 0"),
    "only-to-q.safetensors": (_safetensors(peft(projs=("to_q",))), "to_k or to_v"),
    "non-tensor.pt": (_torch({f"{LAYER}.to_k.lora_A.weight": [1.0, 2.0]}), "not a tensor"),
    "float8.safetensors": (_safetensors(peft(dtype=torch.float8_e4m3fn)), "float8_e4m3fn"),
    "scalar-a.safetensors": (_safetensors(_scalar_a()), "shape ()"),
    "vector-alpha.safetensors": (_safetensors(kohya(alpha=torch.tensor([1.0, 2.0]))), "alpha"),
    "int-keys.pt": (_torch({3: torch.zeros(2, 24), 4: torch.zeros(32, 2)}), "key 3"),
    "huge-alpha.safetensors": (_safetensors(kohya(alpha=torch.tensor(1e30))), "alpha"),
    "negative-alpha.safetensors": (_safetensors(kohya(alpha=torch.tensor(-2.0))), "alpha"),
    "complex.safetensors": (_safetensors(peft(dtype=torch.complex64)), "complex64"),
    "bool.safetensors": (_safetensors(peft(dtype=torch.bool)), "bool"),
    "int8.pt": (_torch(peft(dtype=torch.int8)), "int8"),
    "nan.safetensors": (_safetensors(_nan()), "NaN"),
    "huge-values.safetensors": (_safetensors(_huge_values()), "absurd weights"),
    "ranks-disagree.safetensors": (_safetensors(_ranks_disagree()), "rank"),
    "lone-lora-tensor.safetensors": (
        _safetensors({f"{KOHYA}_to_k.lora_down.weight": torch.randn(2, 24)}),
        "lora_up",
    ),
    "lone-tensor-bad-token.pt": (_torch({"a token with spaces": torch.randn(1, 24)}), "token"),
    "empty-embedding.pt": (_torch({"<empty>": torch.zeros(0, 24)}), "empty"),
    "too-many-vectors.safetensors": (_safetensors({"emb_params": torch.randn(500, 24)}), "500 embedding vectors"),
    "legacy-pickle.pt": (_torch({"<old>": torch.randn(1, 24)}, _use_new_zipfile_serialization=False), "legacy"),
    "truncated.safetensors": (_bytes(_truncated()), "safetensors"),
    "garbage.bin": (_bytes(b"\x93NUMPY not a torch file at all" * 8), "neither"),
    "empty.pt": (_bytes(b""), "empty"),
}


def write_corpus(directory: str | Path) -> dict[Path, str]:
    """Write every hostile file to ``directory``; returns {path: expected words of the error}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (write, expected) in CORPUS.items():
        path = directory / name
        write(path)
        out[path] = expected
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/hostile_files.py OUT_DIR")
    for path in write_corpus(sys.argv[1]):
        print(path)
