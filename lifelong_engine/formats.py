"""Import and export of LoRA files from the diffusers/peft/kohya ecosystem.

``import_lora`` reads (by key pattern, via diffusers' own conversion utilities where they exist):
  - diffusers/peft: ``[unet.]…attn2.to_k.lora_A.weight`` / ``lora_B``;
  - diffusers' older ``…attn2.to_k.lora.down.weight`` and ``…attn2.processor.to_k_lora.down.weight``;
  - kohya: ``lora_unet_…_attn2_to_k.lora_down.weight`` / ``lora_up`` with ``.alpha``
    (scale = alpha / r, alpha defaulting to r), SD-1.x and SDXL names;
  - Custom Diffusion: ``…attn2.processor.to_k_custom_diffusion.weight`` full K/V weights, stored
    as exact low-rank factors of their difference from the base UNet's weights;
  - textual-inversion embeddings: ``{token: (n, D)}``, ``emb_params`` or A1111's ``string_to_param``.
Only the cross-attention projections (attn2 to_k/to_v/to_q/to_out.0) are kept; anything else a file
holds (self-attention, resnets, text encoder) is reported in a warning and left out.

``export_lora`` writes peft or kohya files that ``diffusers``' ``load_lora_weights`` loads.
Files are recognised by content, not by suffix: safetensors, or a torch zip file (``.bin``/``.pt``) read
only with ``torch.load(weights_only=True)``, so a pickle that would run code is refused, never executed.
Hostile files are refused before they cost anything: special files (FIFOs, devices) are not opened for
reading, a torch zip whose records are compressed or declare more bytes than the file holds (a zip bomb)
is not inflated, pre-zip torch pickles are not read. Every problem with a file is a ValueError naming
the file and the problem: non-tensors, non-float dtypes, NaN/inf, shapes, rank 0, alphas outside
(0, 1e6] or LoRA scales above 1024, absurd weights, unusable textual-inversion tokens.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from .concepts import PROJECTIONS, ConceptAdapter, factors_from_delta, validate_name

__all__ = ["import_lora", "export_lora", "load_state_dict", "attn2_layers"]

_LAYER = r"^(?:unet\.)?(?P<layer>.+\.attn2)\."
_ATTN2 = re.compile(_LAYER + r"(?P<proj>to_k|to_v|to_q|to_out\.0)\.(?P<kind>lora_A|lora_B)\.weight$")
_ALPHA = re.compile(_LAYER + r"processor\.(?P<proj>to_k|to_v|to_q|to_out)_lora\.down\.weight\.alpha$")
_CUSTOM = re.compile(_LAYER + r"processor\.(?P<proj>to_k|to_v)_custom_diffusion\.weight$")
_SGM = ("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks")


def load_state_dict(source: str | os.PathLike | dict) -> dict:
    """Tensors of a LoRA file, recognised by content (not by suffix): safetensors, or a torch zip file
    read with weights_only=True after checking that its records are stored uncompressed and declare no
    more bytes than the file holds (so a zip bomb is refused before anything is inflated). Special files
    (FIFOs, devices, directories) are refused without being read."""
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO must not hang the open
    except FileNotFoundError:
        raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ValueError(f"{path}: not a regular file (a directory, FIFO or device); refusing to read it")
    with os.fdopen(fd, "rb") as f:
        head = f.read(16)
        f.seek(0)
        if not head:
            raise ValueError(f"{path}: the file is empty")
        if head[:4] == b"PK\x03\x04":
            return _load_torch_zip(path, f, info.st_size)
        (header_len,) = struct.unpack("<Q", head[:8].ljust(8, b"\0"))
        if head[8:9] == b"{" and header_len <= info.st_size - 8:
            try:
                return safetensors.torch.load(f.read())
            except Exception as e:
                raise ValueError(f"{path}: not a valid safetensors file: {e}") from e
    if path.suffix == ".safetensors":
        raise ValueError(f"{path}: not a valid safetensors file (bad or truncated header)")
    if head[:1] == b"\x80":
        raise ValueError(f"{path}: a legacy (pre-zip) torch pickle, not supported; re-save it with torch.save")
    raise ValueError(f"{path}: neither a safetensors nor a torch zip file (starts with {head[:8]!r})")


def _load_torch_zip(path: Path, f, size: int) -> dict:
    try:
        with zipfile.ZipFile(f) as z:
            records = z.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise ValueError(f"{path}: not a valid torch zip file: {e}") from e
    declared = sum(r.file_size for r in records)
    if declared > size:
        raise ValueError(
            f"{path}: its records declare {declared} bytes, more than the file's {size} (compressed: a zip bomb?)"
        )
    for r in records:
        if r.compress_type != zipfile.ZIP_STORED:
            raise ValueError(
                f"{path}: record {r.filename!r} is compressed; torch files store records uncompressed, refusing it"
            )
    f.seek(0)
    try:
        data = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load: the pickle holds more than tensors ({e})") from None
    except Exception as e:
        raise ValueError(f"{path}: cannot read as a weights-only torch file: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    return data


def attn2_layers(unet: torch.nn.Module) -> list[str]:
    """Cross-attention module paths of a UNet in DESIGN order: down → mid → up."""
    return sorted((n for n, _ in unet.named_modules() if n.endswith(".attn2")), key=_unet_order)


def _unet_order(path: str) -> tuple:
    head = path.split(".")[0]
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(head, 3)
    return (rank, *[(int(p), "") if p.isdigit() else (-1, p) for p in path.split(".")[1:]])


# LoRA tensors must be real floating point; a larger LoRA scale (alpha / rank) than this is refused as absurd.
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_LORA_SCALE = 1024.0
# Bound on an entry of a module's weight delta, scale·|(B·A)_ij| ≤ scale·max_i‖B_i,:‖·max_j‖A_:,j‖ (Cauchy-Schwarz):
# real LoRAs stay far below it (weights are O(1)); a file above it would turn every image to NaN or noise.
MAX_DELTA_BOUND = 1e4
MAX_TI_VECTORS = 75  # CLIP's 77-token context less its start and end tokens
_TOKEN = re.compile(r"\S{1,64}")


def import_lora(
    source: str | os.PathLike | dict,
    name: str,
    unet: torch.nn.Module | None = None,
    token: str | None = None,
    class_word: str | None = None,
) -> ConceptAdapter:
    """A ConceptAdapter from a LoRA, Custom Diffusion or textual-inversion file (or state dict).

    unet: the base UNet, needed for Custom Diffusion weights (stored as deltas from it).
    token: the prompt token of the concept (default ``<name>``; a textual-inversion file's own token).
    Any problem with the file is a ValueError naming the file and the problem.
    """
    validate_name(name)
    what = "a state dict" if isinstance(source, dict) else str(source)
    sd = load_state_dict(source)
    try:
        return _import(sd, name, unet, token, class_word)
    except ValueError as e:
        raise ValueError(f"cannot import {what} as {name!r}: {e}") from e
    except (
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        RuntimeError,
        NotImplementedError,
        ZeroDivisionError,
    ) as e:
        # a file shaped in a way no check above foresaw: still the file's problem, said on one line
        raise ValueError(f"cannot import {what} as {name!r}: {type(e).__name__}: {e}") from e


def _import(sd: dict, name, unet, token, class_word) -> ConceptAdapter:
    for key in sd:
        if not isinstance(key, str):
            raise ValueError(f"key {key!r} is not a string")
    if "string_to_param" in sd or "emb_params" in sd or _looks_like_textual_inversion(sd):
        return _import_textual_inversion(sd, name, token)
    for key, value in sd.items():
        _check_tensor(key, value)
        if key.endswith(".alpha"):
            alpha = value.double()
            if value.numel() != 1 or not 0 < float(alpha.reshape(-1)[0]) <= 1e6:
                raise ValueError(f"{key}: alpha must be one number in (0, 1e6], got {alpha.flatten()[:4].tolist()}")
    if any(_CUSTOM.match(k) for k in sd):
        return _import_custom_diffusion(sd, name, unet, token, class_word)
    alphas = {}
    if any(k.startswith(("lora_unet_", "lora_te")) for k in sd):
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        for key in sd:
            for have, need in ((".lora_down.weight", ".lora_up.weight"), (".lora_up.weight", ".lora_down.weight")):
                if key.endswith(have) and key.removesuffix(have) + need not in sd:
                    raise ValueError(f"{key} has no matching {need.strip('.')}: a LoRA needs lora_A and lora_B")
        if any(k.startswith(_SGM) for k in sd) and unet is None:
            raise ValueError("SGM (SDXL-original) block names need unet= to map them")
        sd, network_alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(
            sd, unet_config=unet.config if unet is not None else None
        )
        for key, value in (network_alphas or {}).items():
            m = _ALPHA.match(key)
            if m:
                alphas[(m["layer"], _proj(m["proj"]))] = float(value)
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    sd = convert_unet_state_dict_to_peft(sd)
    factors: dict[tuple[str, str], dict[str, Tensor]] = {}
    ignored = []
    for key, value in sd.items():
        m = _ATTN2.match(key)
        if m is None:
            ignored.append(key)
            continue
        factors.setdefault((m["layer"], m["proj"]), {})[m["kind"]] = value
    if ignored:
        warnings.warn(
            f"import_lora({name!r}): kept the cross-attention (attn2) LoRA only; left out {len(ignored)} "
            f"other tensors, e.g. {ignored[0]!r}",
            stacklevel=3,
        )
    if not factors:
        raise ValueError("no cross-attention (attn2) LoRA weights found")
    return _adapter_from_factors(name, factors, alphas, token, class_word, method="imported-lora")


def _check_tensor(key: str, value) -> None:
    """A real floating-point tensor with finite values, or a ValueError naming ``key``."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{key}: not a tensor ({type(value).__name__})")
    if value.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{key}: dtype {value.dtype} is not supported (float16, bfloat16, float32 or float64)")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{key}: holds NaN or inf values")


def _proj(short: str) -> str:
    return "to_out.0" if short == "to_out" else short


def _adapter_from_factors(name, factors, alphas, token, class_word, method) -> ConceptAdapter:
    """Zero-pad ranks to the largest, fill absent K/V factors with zeros, and keep one alpha:
    the shared scale when all modules agree, else each module's scale folded into its lora_B."""
    for (layer, proj), f in factors.items():
        if set(f) != {"lora_A", "lora_B"}:
            raise ValueError(f"{layer}.{proj} has {sorted(f)} but needs lora_A and lora_B")
        a, b = f["lora_A"], f["lora_B"]
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(
                f"{layer}.{proj}: lora_A has shape {tuple(a.shape)}, lora_B {tuple(b.shape)}; both must be 2-D"
            )
        if 0 in a.shape or 0 in b.shape:
            raise ValueError(f"{layer}.{proj}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}: rank 0 or empty")
        if b.shape[1] != a.shape[0]:
            raise ValueError(
                f"{layer}.{proj}: lora_A {tuple(a.shape)} has rank {a.shape[0]}, lora_B {tuple(b.shape)} {b.shape[1]}"
            )
    for layer in {layer for layer, _ in factors}:
        if (layer, "to_k") not in factors and (layer, "to_v") not in factors:
            raise ValueError(f"{layer} has LoRA factors on {sorted(p for l, p in factors if l == layer)} only; "
                             "a concept needs to_k or to_v")  # fmt: skip
    rank = max(f["lora_A"].shape[0] for f in factors.values())
    scales = {key: alphas.get(key, f["lora_A"].shape[0]) / f["lora_A"].shape[0] for key, f in factors.items()}
    for (layer, proj), scale in scales.items():
        if not 0 < scale <= MAX_LORA_SCALE:
            raise ValueError(f"{layer}.{proj}: LoRA scale alpha / rank = {scale:g} is outside (0, {MAX_LORA_SCALE:g}]")
    shared = len(set(scales.values())) == 1
    common = next(iter(scales.values())) if shared else 1.0
    layers = sorted({layer for layer, _ in factors}, key=_unet_order)
    lora = {}
    for layer in layers:
        for proj in PROJECTIONS:
            f = factors.get((layer, proj))
            if f is None:
                if proj not in ("to_k", "to_v"):
                    continue
                ref = factors.get((layer, "to_v" if proj == "to_k" else "to_k"))
                a = torch.zeros(rank, ref["lora_A"].shape[1], dtype=ref["lora_A"].dtype)
                b = torch.zeros(ref["lora_B"].shape[0], rank, dtype=ref["lora_B"].dtype)
            else:
                a, b = f["lora_A"], f["lora_B"] * (scales[(layer, proj)] / common)
                pad = rank - a.shape[0]
                if pad:
                    a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
                    b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
            lora[f"{layer}.{proj}.lora_A.weight"] = a.contiguous()
            lora[f"{layer}.{proj}.lora_B.weight"] = b.contiguous()
    token = token or f"<{name}>"
    adapter = ConceptAdapter(
        name=name,
        token=token,
        words=[token],
        class_word=class_word,
        layers=layers,
        lora=lora,
        rank=rank,
        alpha=common * rank,
        method=method,
    )
    if not adapter.is_finite():
        raise ValueError("the LoRA factors overflow to inf once each module's scale is folded in")
    for (layer, proj), f in factors.items():
        a, b = f["lora_A"].double(), f["lora_B"].double()
        bound = scales[(layer, proj)] * float(b.norm(dim=1).max()) * float(a.norm(dim=0).max())
        if bound > MAX_DELTA_BOUND:
            raise ValueError(f"{layer}.{proj}: absurd weights: a delta entry may reach {bound:.3g}")
    return adapter


def _import_custom_diffusion(sd, name, unet, token, class_word) -> ConceptAdapter:
    if unet is None:
        raise ValueError("Custom Diffusion holds full K/V weights; pass unet= (the base)")
    modules = dict(unet.named_modules())
    factors = {}
    for key, weight in sd.items():
        m = _CUSTOM.match(key)
        if m is None:
            continue
        layer, proj = m["layer"], m["proj"]
        if layer not in modules:
            raise ValueError(f"{key} names layer {layer!r}, which the UNet does not have")
        base = getattr(modules[layer], proj).weight
        if base.shape != weight.shape:
            raise ValueError(f"{key} has shape {tuple(weight.shape)}, the UNet's {tuple(base.shape)}")
        a, b = factors_from_delta(weight.double() - base.detach().double().cpu())  # exact: rank min(Dout, Din)
        factors[(layer, proj)] = {"lora_A": a.to(weight.dtype), "lora_B": b.to(weight.dtype)}
    return _adapter_from_factors(name, factors, {}, token, class_word, method="custom-diffusion")


def _looks_like_textual_inversion(sd: dict) -> bool:
    """One tensor of one or more embedding rows, keyed by its token (not by a module path)."""
    if len(sd) != 1:
        return False
    ((key, value),) = sd.items()
    return isinstance(value, Tensor) and value.ndim in (1, 2) and not key.endswith((".weight", ".alpha"))


def _import_textual_inversion(sd, name, token) -> ConceptAdapter:
    if "string_to_param" in sd:
        params = sd["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError(
                f"string_to_param holds {len(params) if isinstance(params, dict) else params!r} embeddings"
            )
        ((key, emb),) = params.items()
        key = f"string_to_param[{key!r}]"
        token = token or (sd.get("name") if isinstance(sd.get("name"), str) else None)
    elif "emb_params" in sd:
        key, emb = "emb_params", sd["emb_params"]
    else:
        ((key, emb),) = sd.items()
        token = token or key
    _check_tensor(key, emb)
    if emb.ndim not in (1, 2) or emb.numel() == 0:
        raise ValueError(f"{key}: the embedding is empty or not (rows, dim): shape {tuple(emb.shape)}")
    emb = emb.detach().reshape(-1, emb.shape[-1])
    if emb.shape[0] > MAX_TI_VECTORS:
        raise ValueError(f"{key}: {emb.shape[0]} embedding vectors; a prompt holds at most {MAX_TI_VECTORS} tokens")
    token = token or f"<{name}>"
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"the token {token!r} is not usable in a prompt (1 to 64 characters, no spaces); pass token=")
    words = [token] + [f"{token}_{i}" for i in range(1, emb.shape[0])]
    return ConceptAdapter(
        name=name,
        token=token,
        words=words,
        layers=[],
        lora={},
        rank=1,
        token_embeddings=emb.unsqueeze(0).contiguous(),
        method="textual-inversion",
    )


def export_lora(adapter: ConceptAdapter, path: str | os.PathLike, format: str = "peft") -> Path:
    """Write the adapter's UNet LoRA as a safetensors file diffusers' ``load_lora_weights`` reads.

    format: "peft" (``unet.…attn2.to_k.lora_A.weight``) or "kohya" (``lora_unet_…`` with ``.alpha``).
    The LoRA scale is folded into lora_B, so the file means the same under any alpha convention.
    Token embeddings are not part of a diffusers LoRA file and are not written.
    """
    if format not in ("peft", "kohya"):
        raise ValueError(f"export_lora: format={format!r}; expected 'peft' or 'kohya'")
    if not adapter.lora:
        raise ValueError(f"export_lora: concept {adapter.name!r} has no LoRA weights (textual inversion only)")
    sd = {}
    for key, value in adapter.lora.items():
        value = value.detach().cpu().contiguous()
        if ".lora_B." in key:
            value = value * adapter.scale
        sd["unet." + key] = value
    if format == "kohya":
        from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

        sd = {k: v.contiguous() for k, v in convert_state_dict_to_kohya(sd).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, path, metadata={"format": "pt"})
    return path
