"""Where a LoRA's first load goes: full-size SDXL shapes on the CPU (weights left at zero: the load's
Python work does not depend on them), the bench's rank-32 LoRAs, cProfile around LoraManager.apply.

    .venv/bin/python scripts/lora_load_profile.py [--top 25]

Measured 2026-12-02 on this project's idle 2-core CPU machine: the first character 6.3 s, of which
peft's inject_adapter 1.5 s and the clean copies of the base weights 3.0 s; a new character beside two
loaded LoRAs 7.4 s, of which inject_adapter 2.5 s (0.9 s of it peft checking every module name against
every loaded adapter's prefixes, in tuners_utils.inject_adapter) and merging 3.0 s. The merges are fp16
matrix products, slow on a CPU and milliseconds on a GPU; the injection is Python either way. Times
double or triple on a busy machine.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

import torch


def build_pipeline():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mcp_sdxl.engine.loading import SDXL_BASE_CONFIG_DIR as cfg

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg, subfolder="vae"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg, subfolder="text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(cfg, subfolder="text_encoder_2"))
    for model in (unet, vae, te1, te2):
        model.to_empty(device="cpu").half()
        with torch.no_grad():
            for param in model.parameters():
                param.zero_()
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=EulerDiscreteScheduler.from_pretrained(cfg, subfolder="scheduler"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from mcp_sdxl.bench.assets import Assets, build_random_loras
    from mcp_sdxl.engine.loading import SDXL_BASE_CONFIG_DIR, WeightSource
    from mcp_sdxl.engine.lora import LoraManager, LoraSpec

    started = time.perf_counter()
    pipe = build_pipeline()
    print(f"pipeline built in {time.perf_counter() - started:.1f} s")
    folder = Path(tempfile.mkdtemp(prefix="lora-profile-"))
    loras = build_random_loras(Assets("random", None, WeightSource("folder", str(SDXL_BASE_CONFIG_DIR)), {}, {}),
                               folder, SDXL_BASE_CONFIG_DIR)
    manager = LoraManager(pipe)
    others = [LoraSpec("background:b", loras["background"], 0.6), LoraSpec("style:s", loras["style"], 0.5)]
    steps = [
        ("first character", [LoraSpec("character:a", loras["char_a"], 0.8)]),
        ("add background + style", [LoraSpec("character:a", loras["char_a"], 0.8), *others]),
        ("a new character beside them", [LoraSpec("character:b", loras["char_b"], 0.8), *others]),
        ("back to the first (all loaded)", [LoraSpec("character:a", loras["char_a"], 0.8), *others]),
    ]
    for label, specs in steps:
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        manager.apply(specs)
        profile.disable()
        print(f"\n== {label}: {time.perf_counter() - started:.2f} s")
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])


if __name__ == "__main__":
    main()
