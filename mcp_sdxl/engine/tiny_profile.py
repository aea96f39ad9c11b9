"""The tiny profile: the built-in engine used when no SDXL weights are present.

Every registry entry (character, background, style) gets a small random LoRA of its own, in the
formats people actually download: characters in diffusers/peft format, backgrounds in Kohya
format, styles in Kohya format that also trains both text encoders. All are deterministic.
"""

from __future__ import annotations

from pathlib import Path

from mcp_sdxl.engine.controlnet import CONTROL_TYPES
from mcp_sdxl.engine.tiny import build_tiny_lora, ensure_tiny_controlnet, ensure_tiny_model, path_seed

LORA_FORMATS = {
    "character": {"fmt": "diffusers"},
    "background": {"fmt": "kohya"},
    "style": {"fmt": "kohya", "text_encoder": True},
}
SIZE_MULTIPLE = 32  # the tiny UNet's downsampling needs sides divisible by 32


def ensure_tiny_lora(root: Path, kind: str, name: str) -> Path:
    relative = f"loras/{kind}_{name}.safetensors"
    return build_tiny_lora(ensure_tiny_model(root), Path(root) / relative, seed=path_seed(relative), **LORA_FORMATS[kind])


def build_all(settings) -> list[Path]:
    """Build the tiny model, a LoRA per registry entry and every ControlNet; returns what exists."""
    root = settings.tiny_dir
    paths = [ensure_tiny_model(root)]
    for kind, table in settings.loras.kinds().items():
        paths += [ensure_tiny_lora(root, kind, name) for name in table]
    paths += [ensure_tiny_controlnet(root, kind) for kind in CONTROL_TYPES]
    return paths
