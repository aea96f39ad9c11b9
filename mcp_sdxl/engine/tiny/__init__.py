"""Offline SDXL test assets: a deterministic TINY SDXL-architecture pipeline, real-format LoRAs and
ControlNets for it, Civitai-style single-file checkpoints, and the shipped full-size SDXL-base config folder.

Typical use (idempotent, safe across processes):

    from mcp_sdxl.engine.tiny import DEMO_CONTROLNETS, DEMO_LORAS, ensure_tiny_assets
    tiny_dir = ensure_tiny_assets(root, DEMO_LORAS, DEMO_CONTROLNETS, single_file="checkpoints/sdxl-tiny.safetensors")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir, local_files_only=True)
"""

from .assets import (
    DEMO_CONTROLNETS,
    DEMO_LORAS,
    TINY_DIR_NAME,
    ensure_single_file,
    ensure_tiny_assets,
    ensure_tiny_controlnet,
    ensure_tiny_model,
    path_seed,
    tiny_model_dir,
)
from .controlnet import build_tiny_controlnet, make_tiny_controlnet
from .lora import build_tiny_lora
from .pipeline import FORMAT_VERSION, SDXL_BASE_CONFIG_DIR, SIZE_MULTIPLE, build_tiny_sdxl, make_tiny_pipeline
from .single_file import ldm_state_dict, save_single_file

__all__ = [
    "DEMO_CONTROLNETS",
    "DEMO_LORAS",
    "FORMAT_VERSION",
    "SDXL_BASE_CONFIG_DIR",
    "SIZE_MULTIPLE",
    "TINY_DIR_NAME",
    "build_tiny_controlnet",
    "build_tiny_lora",
    "build_tiny_sdxl",
    "ensure_single_file",
    "ensure_tiny_assets",
    "ensure_tiny_controlnet",
    "ensure_tiny_model",
    "ldm_state_dict",
    "make_tiny_controlnet",
    "make_tiny_pipeline",
    "path_seed",
    "save_single_file",
    "tiny_model_dir",
]
