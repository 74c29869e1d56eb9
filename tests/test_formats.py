"""LoRA interop: kohya/peft/old diffusers/Custom Diffusion/textual inversion in, peft/kohya out,
checked against diffusers' own load_lora_weights on a tiny UNet."""

import copy
import os

import pytest
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from lifelong_engine.formats import attn2_layers, export_lora, import_lora


@pytest.fixture(scope="module")
def base_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()


class _Loader(StableDiffusionLoraLoaderMixin):
    """The smallest object diffusers' load_lora_weights accepts: a UNet, no text encoder."""

    hf_device_map = None
    components: dict = {}

    def __init__(self, unet):
        self.unet = unet
        self.text_encoder = None


INPUTS = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor(10))
TEXT = torch.randn(1, 7, 24, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def _run(unet):
    return unet(*INPUTS, encoder_hidden_states=TEXT).sample


def diffusers_output(base_unet, path):
    unet = copy.deepcopy(base_unet)
    _Loader(unet).load_lora_weights(str(path), adapter_name="test")
    return _run(unet)


def manual_output(base_unet, adapter):
    unet = copy.deepcopy(base_unet)
    with torch.no_grad():
        for layer in adapter.layers:
            for proj in adapter.projections:
                unet.get_submodule(f"{layer}.{proj}").weight += adapter.delta(layer, proj)
    return _run(unet)


def kohya_file(base_unet, path, ranks=(2, 3), alpha=1.5, extra=False):
    g = torch.Generator().manual_seed(3)
    sd = {}
    for i, layer in enumerate(attn2_layers(base_unet)):
        module = base_unet.get_submodule(layer)
        for proj in ("to_k", "to_v"):
            r = ranks[i % len(ranks)]
            key = f"lora_unet_{layer.replace('.', '_')}_{proj}"
            sd[f"{key}.lora_down.weight"] = torch.randn(r, 24, generator=g) * 0.3
            sd[f"{key}.lora_up.weight"] = torch.randn(getattr(module, proj).out_features, r, generator=g) * 0.3
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    if extra:
        layer = attn2_layers(base_unet)[0].replace("attn2", "attn1").replace(".", "_")
        sd[f"lora_unet_{layer}_to_q.lora_down.weight"] = torch.randn(2, 32, generator=g)
        sd[f"lora_unet_{layer}_to_q.lora_up.weight"] = torch.randn(32, 2, generator=g)
    safetensors.torch.save_file(sd, path)
    return path


def test_layer_order_is_down_mid_up(base_unet):
    layers = attn2_layers(base_unet)
    heads = [layer.split(".")[0] for layer in layers]
    assert heads == sorted(heads, key=["down_blocks", "mid_block", "up_blocks"].index)
    assert len(layers) == 7


def test_kohya_import_export_matches_diffusers(base_unet, tmp_path):
    src = kohya_file(base_unet, tmp_path / "kohya.safetensors")
    want = diffusers_output(base_unet, src)
    assert not torch.allclose(want, _run(base_unet), atol=1e-3)  # the LoRA does something
    adapter = import_lora(src, "kohya-concept")
    assert adapter.rank == 3 and len(adapter.layers) == 7
    torch.testing.assert_close(manual_output(base_unet, adapter), want, atol=1e-5, rtol=1e-4)
    for fmt in ("peft", "kohya"):
        out = export_lora(adapter, tmp_path / f"out-{fmt}.safetensors", format=fmt)
        torch.testing.assert_close(diffusers_output(base_unet, out), want, atol=1e-5, rtol=1e-4)


def test_kohya_alpha_defaults_to_rank(base_unet, tmp_path):
    src = kohya_file(base_unet, tmp_path / "k.safetensors", ranks=(2,))
    sd = {k: v for k, v in safetensors.torch.load_file(src).items() if not k.endswith(".alpha")}
    adapter = import_lora(sd, "no-alpha")
    assert adapter.scale == 1.0
    layer = adapter.layers[0]
    a, b = adapter.factors(layer, "to_k")
    assert torch.equal(b, sd[f"lora_unet_{layer.replace('.', '_')}_to_k.lora_up.weight"])


def test_non_attn2_weights_are_reported_and_left_out(base_unet, tmp_path):
    src = kohya_file(base_unet, tmp_path / "k.safetensors", extra=True)
    with pytest.warns(UserWarning, match="left out 2 other tensors"):
        adapter = import_lora(src, "partial")
    assert all(layer.endswith("attn2") for layer in adapter.layers)


def test_peft_and_old_diffusers_formats_agree(base_unet, tmp_path):
    adapter = import_lora(kohya_file(base_unet, tmp_path / "k.safetensors"), "ref")
    peft_path = export_lora(adapter, tmp_path / "peft.safetensors")
    peft = safetensors.torch.load_file(peft_path)
    assert all(k.startswith("unet.") and ".attn2." in k for k in peft)
    no_prefix = {k.removeprefix("unet."): v for k, v in peft.items()}
    old_style = {
        k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in no_prefix.items()
    }
    processor = {
        k.replace(".to_k.lora_A.", ".processor.to_k_lora.down.")
        .replace(".to_k.lora_B.", ".processor.to_k_lora.up.")
        .replace(".to_v.lora_A.", ".processor.to_v_lora.down.")
        .replace(".to_v.lora_B.", ".processor.to_v_lora.up."): v
        for k, v in no_prefix.items()
    }
    for sd in (peft, no_prefix, old_style, processor):
        other = import_lora(sd, "other")
        assert other.layers == adapter.layers
        for layer in adapter.layers:
            for proj in ("to_k", "to_v"):
                torch.testing.assert_close(other.delta(layer, proj), adapter.delta(layer, proj))


def test_sdxl_sgm_names_map_with_unet(base_unet):
    g = torch.Generator().manual_seed(4)
    sd = {}
    for sgm in ("input_blocks_1_1", "middle_block_1", "output_blocks_0_1"):
        key = f"lora_unet_{sgm}_transformer_blocks_0_attn2_to_k"
        dout = 64 if sgm != "input_blocks_1_1" else 32
        sd[f"{key}.lora_down.weight"] = torch.randn(2, 24, generator=g)
        sd[f"{key}.lora_up.weight"] = torch.randn(dout, 2, generator=g)
    with pytest.raises(ValueError, match="need unet="):
        import_lora(sd, "sgm")
    adapter = import_lora(sd, "sgm", unet=base_unet)
    assert [layer.split(".")[0] for layer in adapter.layers] == ["down_blocks", "mid_block", "up_blocks"]


def test_custom_diffusion_weights_become_exact_deltas(base_unet):
    layer = attn2_layers(base_unet)[2]
    module = base_unet.get_submodule(layer)
    delta_k = torch.randn_like(module.to_k.weight) * 0.1
    sd = {
        f"{layer}.processor.to_k_custom_diffusion.weight": module.to_k.weight.detach() + delta_k,
        f"{layer}.processor.to_v_custom_diffusion.weight": module.to_v.weight.detach().clone(),
    }
    with pytest.raises(ValueError, match="pass unet="):
        import_lora(sd, "cd")
    adapter = import_lora(sd, "cd", unet=base_unet)
    assert adapter.method == "custom-diffusion"
    torch.testing.assert_close(adapter.delta(layer, "to_k"), delta_k, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(adapter.delta(layer, "to_v"), torch.zeros_like(delta_k), atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["diffusers", "emb_params", "a1111"])
def test_textual_inversion(tmp_path, layout):
    emb = torch.randn(2, 24)
    if layout == "diffusers":
        sd, path = {"<cat-toy>": emb}, tmp_path / "ti.safetensors"
        safetensors.torch.save_file(sd, path)
    elif layout == "emb_params":
        path = tmp_path / "ti.safetensors"
        safetensors.torch.save_file({"emb_params": emb}, path)
    else:
        path = tmp_path / "ti.pt"
        torch.save({"string_to_param": {"*": emb}, "name": "<cat-toy>"}, path)
    adapter = import_lora(path, "cat-toy", token=None if layout != "emb_params" else "<cat-toy>")
    assert adapter.token == "<cat-toy>" and adapter.words == ["<cat-toy>", "<cat-toy>_1"]
    assert torch.equal(adapter.token_embeddings[0], emb) and adapter.layers == []
    with pytest.raises(ValueError, match="textual inversion only"):
        export_lora(adapter, tmp_path / "x.safetensors")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"lora": _Exploit(marker)}, path)
    with pytest.raises(ValueError, match="refused to load"):
        import_lora(path, "evil")
    assert not marker.exists()


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        import_lora(bad, "bad")
    with pytest.raises(FileNotFoundError):
        import_lora(tmp_path / "missing.safetensors", "x")
    with pytest.raises(ValueError, match="no cross-attention"), pytest.warns(UserWarning, match="left out"):
        import_lora({"something.else.weight": torch.zeros(2, 2), "other": torch.zeros(3)}, "x")
    with pytest.raises(ValueError, match="format='onnx'"):
        export_lora(import_lora(kohya_file_sd(), "k"), tmp_path / "x", format="onnx")


def kohya_file_sd():
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    return {f"{key}.lora_down.weight": torch.randn(2, 24), f"{key}.lora_up.weight": torch.randn(32, 2)}


def test_textual_inversion_with_several_embeddings_is_refused(tmp_path):
    path = tmp_path / "two.pt"
    torch.save({"string_to_param": {"*": torch.randn(1, 24), "#": torch.randn(1, 24)}}, path)
    with pytest.raises(ValueError, match="string_to_param holds 2 embeddings"):
        import_lora(path, "two")
