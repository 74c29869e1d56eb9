"""The README's "diffusers drop-in" equality table: LifelongPipeline vs diffusers on the tests' tiny random
SD / SDXL pipelines (fp32, CPU, 2 steps, same seed). Prints `| feature | yes/no | max diff |` rows.

    python -P bench/dropin_table.py
"""

import copy
import pathlib
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from concept_factory import concept_for_unet
from peft import LoraConfig, get_peft_model
from test_user_loras import TARGETS, add_random_lora, lora_file
from test_wrapped_unets import PUBLIC_CALLS
from tiny_pipes import tiny_sd_pipeline, tiny_sdxl_pipeline

from lifelong_engine import LifelongPipeline
from lifelong_engine.formats import export_lora, token_rows_path

tmp = pathlib.Path(tempfile.mkdtemp())


def run(p, prompt="a red ball"):
    return p(
        prompt, num_inference_steps=2, guidance_scale=7.5, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images


def d(a, b):
    return float(np.abs(a - b).max())


def row(feature, diff, tol=1e-5):
    print(f"| {feature} | {'yes' if diff <= tol else 'NO'} | {diff:.1e} |", flush=True)


for make, tag in ((tiny_sd_pipeline, "SD"), (tiny_sdxl_pipeline, "SDXL")):
    pipe = make()
    add_random_lora(pipe.unet, "user", 1)
    e = run(pipe)
    lp = LifelongPipeline.from_pipe(pipe)
    row(f"user LoRA (unet.add_adapter, before wrapping), {tag}", d(run(lp), e))
    path = lora_file(make, tmp, "style" + tag, 2)
    pipe = make()
    lp = LifelongPipeline.from_pipe(pipe)
    pipe.load_lora_weights(path, adapter_name="s")
    row(f"user LoRA (load_lora_weights after wrapping), {tag}", d(run(lp), run(pipe)))
    pipe.set_adapters("s", 0.4)
    row(f"set_adapters weight 0.4, {tag}", d(run(lp), run(pipe)))
    pipe.disable_lora()
    row(f"disable_lora, {tag}", d(run(lp), run(pipe)))
pipe = tiny_sd_pipeline()
add_random_lora(pipe.unet, "user", 1)
ref = copy.deepcopy(pipe)
c = concept_for_unet(pipe.unet, "sks", rank=3, projections=tuple(TARGETS), alpha=1.5)
c.token = "sks"
ref.load_lora_weights(str(export_lora(c, tmp / "sks.safetensors")), adapter_name="sks")
ref.set_adapters(["user", "sks"], [0.75, 1.0])
pipe.set_adapters("user", 0.75)
lp = LifelongPipeline.from_pipe(pipe)
lp.add_concept(c)
row("concept + user LoRA vs both as peft adapters, SD", d(run(lp, "a sks dog"), run(ref, "a sks dog")))
plain, pipe = tiny_sd_pipeline(), tiny_sd_pipeline()
pipe.unet = get_peft_model(pipe.unet, LoraConfig(r=2, target_modules=["to_k"]))
row("UNet wrapped by peft.get_peft_model, SD", d(run(LifelongPipeline.from_pipe(pipe)), run(plain)))
for call in PUBLIC_CALLS:
    for make, tag in ((tiny_sd_pipeline, "SD"), (tiny_sdxl_pipeline, "SDXL")):
        pipe = make()
        PUBLIC_CALLS[call](pipe)
        e = run(pipe)
        row(f"{call} before wrapping, {tag}", d(run(LifelongPipeline.from_pipe(pipe)), e))
pipe = tiny_sd_pipeline()
lp = LifelongPipeline.from_pipe(pipe)
t = concept_for_unet(pipe.unet, "dog1", lp.text.token_width, layerwise=False)
lp.add_concept(t)
pipe.load_textual_inversion(str(token_rows_path(export_lora(t, tmp / "dog1.safetensors"))))
P = "a photo of <dog1> on grass"
row(
    "exported token rows in load_textual_inversion, prompt embedding, SD",
    float((lp.encode_prompt(P).per_layer[0, 0] - pipe.encode_prompt(P, "cpu", 1, False)[0][0]).abs().max()),
)
