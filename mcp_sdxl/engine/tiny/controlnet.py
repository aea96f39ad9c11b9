"""Tiny SDXL ControlNets (diffusers folder layout) that really steer the tiny pipeline."""

from __future__ import annotations

from pathlib import Path

import torch

from ._atomic import build_dir_once, stamp
from .pipeline import FORMAT_VERSION, built_stamp

# The conditioning embedding halves the control image len(...) - 1 times: 4 entries -> 8x, the VAE factor,
# so a 64 px (128 px) control image lands on the 8x8 (16x16) latent grid. Widths shrunk from SDXL's
# (16, 32, 96, 256).
CONDITIONING_CHANNELS = (16, 16, 32, 32)
# Std of the zero-initialised residual outputs, and gain of the conditioning embedding's output conv (in
# units of 1/sqrt(fan_in)). Tuned so that at conditioning_scale=1.0 the ControlNet, and the control image
# itself, visibly change a 64x64 image without saturating it.
ZERO_LAYER_STD = 0.1
CONDITIONING_GAIN = 4.0


def controlnet_stamp(base_dir: Path, seed: int) -> str:
    return stamp(
        kind="controlnet",
        format=FORMAT_VERSION,
        base=built_stamp(base_dir),
        seed=seed,
        conditioning_channels=list(CONDITIONING_CHANNELS),
    )


def build_tiny_controlnet(base_dir: Path | str, dest_dir: Path | str, seed: int) -> Path:
    """ControlNetModel.from_unet(tiny UNet) with its zero layers randomised; save_pretrained to `dest_dir`."""
    base_dir = Path(base_dir)

    def build(tmp: Path) -> None:
        make_tiny_controlnet(base_dir, seed).save_pretrained(tmp, safe_serialization=True)

    return build_dir_once(Path(dest_dir), controlnet_stamp(base_dir, seed), build)


def make_tiny_controlnet(base_dir: Path, seed: int):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    torch.manual_seed(seed)  # from_unet draws the conditioning embedding from the global generator
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _init_conditioning_embedding(controlnet.controlnet_cond_embedding, generator)
        # ControlNet starts as a no-op: its residual outputs are zero-initialised so training can grow them.
        for layer in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            _normal_(layer.weight, ZERO_LAYER_STD, generator)
            _normal_(layer.bias, ZERO_LAYER_STD, generator)
    return controlnet.eval()


def _init_conditioning_embedding(embedding, generator: torch.Generator) -> None:
    # PyTorch's default conv init shrinks activations ~3x per layer: after 7 convs the control image's pattern
    # is ~1e-4 of the latent features and different control images give the same output. He init keeps it.
    for conv in [embedding.conv_in, *embedding.blocks]:
        _normal_(conv.weight, (2 / conv.weight[0].numel()) ** 0.5, generator)
        conv.bias.zero_()
    out = embedding.conv_out  # zero-initialised by diffusers
    _normal_(out.weight, CONDITIONING_GAIN / out.weight[0].numel() ** 0.5, generator)
    out.bias.zero_()


def _normal_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> None:
    tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
