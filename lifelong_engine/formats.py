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
Files are read with safetensors; legacy ``.bin``/``.pt`` only with ``torch.load(weights_only=True)``,
so a pickle that would run code is refused, never executed.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from .concepts import PROJECTIONS, ConceptAdapter, factors_from_delta

__all__ = ["import_lora", "export_lora", "load_state_dict", "attn2_layers"]

_LAYER = r"^(?:unet\.)?(?P<layer>.+\.attn2)\."
_ATTN2 = re.compile(_LAYER + r"(?P<proj>to_k|to_v|to_q|to_out\.0)\.(?P<kind>lora_A|lora_B)\.weight$")
_ALPHA = re.compile(_LAYER + r"processor\.(?P<proj>to_k|to_v|to_q|to_out)_lora\.down\.weight\.alpha$")
_CUSTOM = re.compile(_LAYER + r"processor\.(?P<proj>to_k|to_v)_custom_diffusion\.weight$")
_SGM = ("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks")


def load_state_dict(source: str | os.PathLike | dict) -> dict:
    """Tensors of a LoRA file: safetensors, or a legacy pickle file read with weights_only=True."""
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path)
        except Exception as e:
            raise ValueError(f"{path}: not a valid safetensors file: {e}") from e
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
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
    """
    sd = load_state_dict(source)
    if "string_to_param" in sd or "emb_params" in sd or _looks_like_textual_inversion(sd):
        return _import_textual_inversion(sd, name, token)
    if any(_CUSTOM.match(k) for k in sd):
        return _import_custom_diffusion(sd, name, unet, token, class_word)
    alphas = {}
    if any(k.startswith(("lora_unet_", "lora_te")) for k in sd):
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        if any(k.startswith(_SGM) for k in sd) and unet is None:
            raise ValueError(f"import_lora({name!r}): SGM (SDXL-original) block names need unet= to map them")
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
            stacklevel=2,
        )
    if not factors:
        raise ValueError(f"import_lora({name!r}): no cross-attention (attn2) LoRA weights found")
    return _adapter_from_factors(name, factors, alphas, token, class_word, method="imported-lora")


def _proj(short: str) -> str:
    return "to_out.0" if short == "to_out" else short


def _adapter_from_factors(name, factors, alphas, token, class_word, method) -> ConceptAdapter:
    """Zero-pad ranks to the largest, fill absent K/V factors with zeros, and keep one alpha:
    the shared scale when all modules agree, else each module's scale folded into its lora_B."""
    for (layer, proj), f in factors.items():
        if set(f) != {"lora_A", "lora_B"}:
            raise ValueError(f"import_lora({name!r}): {layer}.{proj} has {sorted(f)} but needs lora_A and lora_B")
    rank = max(f["lora_A"].shape[0] for f in factors.values())
    scales = {key: alphas.get(key, f["lora_A"].shape[0]) / f["lora_A"].shape[0] for key, f in factors.items()}
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
    return ConceptAdapter(
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


def _import_custom_diffusion(sd, name, unet, token, class_word) -> ConceptAdapter:
    if unet is None:
        raise ValueError(f"import_lora({name!r}): Custom Diffusion holds full K/V weights; pass unet= (the base)")
    modules = dict(unet.named_modules())
    factors = {}
    for key, weight in sd.items():
        m = _CUSTOM.match(key)
        if m is None:
            continue
        layer, proj = m["layer"], m["proj"]
        if layer not in modules:
            raise ValueError(f"import_lora({name!r}): {key} names layer {layer!r}, which the UNet does not have")
        base = getattr(modules[layer], proj).weight
        if base.shape != weight.shape:
            raise ValueError(
                f"import_lora({name!r}): {key} has shape {tuple(weight.shape)}, the UNet's {tuple(base.shape)}"
            )
        a, b = factors_from_delta(weight.double() - base.detach().double().cpu())  # exact: rank min(Dout, Din)
        factors[(layer, proj)] = {"lora_A": a.to(weight.dtype), "lora_B": b.to(weight.dtype)}
    return _adapter_from_factors(name, factors, {}, token, class_word, method="custom-diffusion")


def _looks_like_textual_inversion(sd: dict) -> bool:
    return len(sd) == 1 and isinstance(next(iter(sd.values())), Tensor) and next(iter(sd.values())).ndim in (1, 2)


def _import_textual_inversion(sd, name, token) -> ConceptAdapter:
    if "string_to_param" in sd:
        if len(sd["string_to_param"]) != 1:
            raise ValueError(f"import_lora({name!r}): string_to_param holds {len(sd['string_to_param'])} embeddings")
        (emb,) = sd["string_to_param"].values()
        token = token or (sd.get("name") if isinstance(sd.get("name"), str) else None)
    elif "emb_params" in sd:
        emb = sd["emb_params"]
    else:
        ((found, emb),) = sd.items()
        token = token or found
    emb = emb.detach().reshape(-1, emb.shape[-1])
    token = token or f"<{name}>"
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
