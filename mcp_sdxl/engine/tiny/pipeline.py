"""A deterministic, random-weight TINY pipeline with the exact SDXL architecture (diffusers folder layout).

It runs the real diffusers code paths (two CLIP encoders, "text_time" micro-conditioning, 8x VAE, LoRA and
ControlNet hooks, single-file loading) on CPU in ~0.1 s per 64x64 image, because no real weights can be
downloaded here. Block topology matches SDXL base (3 UNet levels, 2 resnets per level, attention only in the
two deeper levels, 4 VAE levels), only the widths are shrunk.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ._atomic import build_dir_once, dir_stamp, stamp

SDXL_BASE_CONFIG_DIR = Path(__file__).resolve().parent.parent / "sdxl_base_config"
# Bump whenever the configs or the init below change: stamped assets then rebuild themselves.
FORMAT_VERSION = 1

# Traps (diffusers SDXL detection): text_encoder_2 needs >= 10 layers, and the two encoders must differ in
# width. Both use the real 49,408-token CLIP vocabulary so the real tokenizers drive them.
TEXT_ENCODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}
TEXT_ENCODER_2 = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 10,
    "num_attention_heads": 4,
    "hidden_act": "gelu",
    "projection_dim": 32,
}
# Shared by both encoders, as in SDXL base (eos_token_id=2 keeps the legacy "argmax id" pooling SDXL uses).
CLIP_COMMON = {
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "layer_norm_eps": 1e-5,
}

ADDITION_TIME_EMBED_DIM = 8
UNET = {
    "sample_size": 8,  # default output = 8 * 8 = 64 px
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4, 4),  # diffusers' name; SDXL uses it as the number of heads
    "transformer_layers_per_block": (1, 1, 2),
    "cross_attention_dim": TEXT_ENCODER["hidden_size"] + TEXT_ENCODER_2["hidden_size"],  # the two are concatenated
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
    # 6 micro-conditioning numbers (original size, crop, target size), each embedded, + pooled text (enc. 2)
    "projection_class_embeddings_input_dim": 6 * ADDITION_TIME_EMBED_DIM + TEXT_ENCODER_2["projection_dim"],
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (32, 32, 64, 64),  # 4 levels -> 3 downsamples -> the 8x factor SDXL code assumes
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "sample_size": 64,
    "scaling_factor": 0.13025,  # SDXL's
    "force_upcast": True,
}
# The tiny UNet downsamples twice and the VAE 8x: images must be multiples of 32 px (64, 96, 128, ...).
SIZE_MULTIPLE = 32


def tiny_stamp(seed: int) -> str:
    return stamp(kind="sdxl-tiny", format=FORMAT_VERSION, seed=seed)


def make_tiny_pipeline(seed: int = 0):
    """Build the tiny StableDiffusionXLPipeline in memory (deterministic for a given seed)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    # One seed per component, so changing one component's config never reshuffles the others.
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_COMMON, **TEXT_ENCODER))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_COMMON, **TEXT_ENCODER_2))
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(**UNET)
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(**VAE)
    # SDXL base ships EulerDiscrete; its noise schedule (scaled_linear 0.00085-0.012, leading spacing,
    # steps_offset 1) carried over to DPM-Solver++ is what SDXL UIs call "DPM++ 2M".
    scheduler = DPMSolverMultistepScheduler.from_pretrained(SDXL_BASE_CONFIG_DIR, subfolder="scheduler")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(SDXL_BASE_CONFIG_DIR, subfolder="tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(SDXL_BASE_CONFIG_DIR, subfolder="tokenizer_2"),
        unet=unet,
        scheduler=scheduler,
    )
    for model in (text_encoder, text_encoder_2, unet, vae):
        model.eval()
    return pipe


def copy_sdxl_tokenizers(pipeline_dir: Path) -> None:
    """Replace saved tokenizers by the shipped SDXL-base files (vocab.json + merges.txt + configs).

    transformers 5 saves only tokenizer.json; the slow-format files are what SDXL repos ship and what every
    transformers version (and non-HF tooling) can read.
    """
    for name in ("tokenizer", "tokenizer_2"):
        target = Path(pipeline_dir) / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(SDXL_BASE_CONFIG_DIR / name, target)


def build_tiny_sdxl(dest: Path | str, seed: int = 0) -> Path:
    """Write the tiny pipeline to `dest` (safetensors, diffusers layout). Idempotent and atomic."""

    def build(tmp: Path) -> None:
        pipe = make_tiny_pipeline(seed)
        pipe.save_pretrained(tmp, safe_serialization=True)
        copy_sdxl_tokenizers(tmp)

    return build_dir_once(Path(dest), tiny_stamp(seed), build)


def built_stamp(pipeline_dir: Path | str) -> str:
    """The stamp of a built tiny folder (derived assets embed it, so they rebuild when the base changes)."""
    found = dir_stamp(Path(pipeline_dir))
    if found is None:
        raise FileNotFoundError(f"{pipeline_dir} is not a built tiny SDXL folder (no marker)")
    return found
