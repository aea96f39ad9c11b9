"""Real LoRA files for the tiny pipeline, in the two formats users download.

- "diffusers": what diffusers' SDXL training scripts write (peft adapter -> convert_state_dict_to_diffusers ->
  StableDiffusionXLPipeline.save_lora_weights): keys `unet.<module>.lora.down.weight`, ...
- "kohya": the Civitai/A1111 format of kohya sd-scripts: `lora_unet_<SGM module>.lora_down.weight` /
  `.lora_up.weight` / `.alpha`, text encoders as `lora_te1_...` / `lora_te2_...`, plus `ss_*` metadata.

peft initialises lora_B to zero (a no-op adapter), so both factors are redrawn from a seeded generator:
a weight of 1.0 then visibly changes a 64x64 image without blowing it up.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ._atomic import STAMP_KEY, build_file_once, save_safetensors, stamp
from .pipeline import FORMAT_VERSION, built_stamp
from .single_file import hf_clip_name, to_sgm_unet_name, unet_prefix_map

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
FORMATS = ("diffusers", "kohya")
# Std of lora_B (lora_A ~ kaiming-uniform). Tuned on the tiny profile: at weight 1.0 a UNet LoRA moves a
# 64x64 image by ~0.035 mean absolute (0-1 scale), one with text-encoder layers by ~0.06: far above float
# noise, with no more saturated pixels than the base image.
LORA_B_STD = 1.0
TEXT_LORA_B_STD = 0.5


def lora_stamp(base_dir: Path, seed: int, fmt: str, text_encoder: bool, rank: int) -> str:
    return stamp(
        kind="lora",
        format=FORMAT_VERSION,
        base=built_stamp(base_dir),
        seed=seed,
        fmt=fmt,
        text_encoder=text_encoder,
        rank=rank,
    )


def build_tiny_lora(
    base_dir: Path | str,
    dest_file: Path | str,
    seed: int,
    fmt: str = "diffusers",
    text_encoder: bool = False,
    rank: int = 4,
) -> Path:
    """Write a deterministic LoRA for the tiny pipeline at `base_dir`. Idempotent and atomic."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, not {fmt!r}")
    base_dir = Path(base_dir)
    wanted = lora_stamp(base_dir, seed, fmt, text_encoder, rank)

    def build(tmp: Path) -> None:
        layers = random_lora_layers(base_dir, seed, text_encoder, rank)
        writer = _write_diffusers if fmt == "diffusers" else _write_kohya
        writer(tmp, layers, base_dir, rank, wanted)

    return build_file_once(Path(dest_file), wanted, build)


def random_lora_layers(base_dir: Path, seed: int, text_encoder: bool, rank: int) -> dict[str, dict]:
    """component name -> peft state dict (`<module>.lora_A.weight` / `.lora_B.weight`) with random factors."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    generator = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=UNET_TARGETS))
    layers = {"unet": _randomise(get_peft_model_state_dict(unet), generator, LORA_B_STD)}
    if text_encoder:
        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            model = cls.from_pretrained(base_dir, subfolder=name)
            # transformers' own add_adapter demands peft >= 0.22 (unreleased); peft's injector is equivalent.
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TEXT_ENCODER_TARGETS), model)
            randomised = _randomise(get_peft_model_state_dict(model), generator, TEXT_LORA_B_STD)
            layers[name] = {hf_clip_name(k): v for k, v in randomised.items()}
    return layers


def _randomise(state_dict: dict, generator: torch.Generator, b_std: float) -> dict:
    out = {}
    for key in sorted(state_dict):  # fixed order: the generator stream must not depend on dict order
        weight = state_dict[key]
        if ".lora_A." in key:
            bound = 1 / math.sqrt(weight.shape[1])  # kaiming-uniform(a=sqrt(5)), as peft/nn.Linear init
            out[key] = (torch.rand(weight.shape, generator=generator) * 2 - 1) * bound
        else:
            out[key] = torch.randn(weight.shape, generator=generator) * b_std
    return out


def _write_diffusers(dest: Path, layers: dict, base_dir: Path, rank: int, wanted: str) -> None:
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    converted = {name: convert_state_dict_to_diffusers(sd) for name, sd in layers.items()}
    StableDiffusionXLPipeline.save_lora_weights(
        save_directory=dest.parent,
        weight_name=dest.name,
        unet_lora_layers=converted["unet"],
        text_encoder_lora_layers=converted.get("text_encoder"),
        text_encoder_2_lora_layers=converted.get("text_encoder_2"),
        save_function=lambda weights, path: save_safetensors(weights, path, {"format": "pt", STAMP_KEY: wanted}),
    )


_KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def _write_kohya(dest: Path, layers: dict, base_dir: Path, rank: int, wanted: str) -> None:
    from diffusers import UNet2DConditionModel

    sgm_prefixes = unet_prefix_map(UNet2DConditionModel.load_config(base_dir, subfolder="unet"))
    tensors = {}
    for component, state_dict in layers.items():
        for key, value in state_dict.items():
            module, _, factor = key.rpartition(".lora_")  # factor: "A.weight" | "B.weight"
            if component == "unet":
                module = to_sgm_unet_name(module, sgm_prefixes)  # kohya SDXL files use SGM block names
            name = _KOHYA_PREFIXES[component] + module.replace(".", "_")
            # Civitai files are fp16; loaders upcast.
            tensors[f"{name}.lora_down.weight" if factor == "A.weight" else f"{name}.lora_up.weight"] = value.half()
            tensors[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)  # alpha/rank = 1
    metadata = {
        "format": "pt",
        STAMP_KEY: wanted,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_base_model_version": "sdxl_base_v1-0",
    }
    save_safetensors(tensors, dest, metadata)
