"""Editing an image that exists: img2img, inpainting, and the tiled img2img pass that upscales.

diffusers' SDXL img2img and inpaint pipelines are built from the loaded pipeline's components (the same
UNet, text encoders and VAE, fused LoRAs included): no second copy of any weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageFilter

from mcp_sdxl.errors import UserInputError


def denoise_steps(steps: int, strength: float) -> int:
    """The steps an img2img call runs: diffusers starts `strength` of the way into the schedule."""
    return min(int(steps * strength), steps)


def prepare(engine, request):
    """The img2img or inpaint pipeline for `request.init_image` and its extra call arguments."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    from mcp_sdxl.engine.accel import pipeline_like

    if request.controls:
        raise UserInputError("a source image and ControlNet controls in one call are not supported; "
                             "edit without controls, or generate_with_control first and edit its result")
    if denoise_steps(request.steps, request.strength) < 1:
        raise UserInputError(f"strength {request.strength:g} with {request.steps} steps runs no step; "
                             f"use strength >= {1 / request.steps:.3f}, more steps, or 0 for the source unchanged")
    size = (request.width, request.height)
    if request.init_image.size != size:
        raise UserInputError(f"the source image is {request.init_image.size}, the call asks for {size}")
    extra = {"image": request.init_image, "strength": float(request.strength)}
    if request.mask is None:
        cls = StableDiffusionXLImg2ImgPipeline
    else:
        if request.mask.size != size:
            raise UserInputError(f"the mask is {request.mask.size}, the image {size}: they must match")
        cls = StableDiffusionXLInpaintPipeline
        extra.update(mask_image=request.mask, width=request.width, height=request.height)
    pipe = pipeline_like(cls, engine.pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe, extra


def keep_outside_mask(source: Image.Image, result: Image.Image, mask: Image.Image, feather_px: int) -> Image.Image:
    """The source's own pixels wherever the mask is black (the VAE round trip would shift them slightly);
    the mask's edge is feathered inwards only, so nothing outside the mask changes."""
    from diffusers.image_processor import VaeImageProcessor

    binary = mask.convert("L").point(lambda v: 255 if v >= 128 else 0)
    blend = binary
    if feather_px > 0:
        blend = ImageChops.multiply(binary.filter(ImageFilter.GaussianBlur(feather_px)), binary)
    return VaeImageProcessor().apply_overlay(blend, source.convert("RGB"), result.convert("RGB"))


# ---------------------------------------------------------------------------------------------- tiles
@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of a tiled pass sit on a canvas, and how they blend where they overlap."""

    canvas: tuple[int, int]  # (width, height), padded up to whole tiles' multiple
    tile: tuple[int, int]
    xs: tuple[int, ...]
    ys: tuple[int, ...]
    overlap: int

    @property
    def count(self) -> int:
        return len(self.xs) * len(self.ys)

    def boxes(self) -> list[tuple[int, int, int, int]]:
        tw, th = self.tile
        return [(x, y, x + tw, y + th) for y in self.ys for x in self.xs]


def tile_grid(width: int, height: int, tile: int, overlap: int, multiple: int) -> TileGrid:
    """Tiles of at most `tile` pixels (a multiple of `multiple`) covering width x height with at least
    `overlap` pixels shared between neighbours. A side shorter than a tile is padded to the multiple."""
    def axis(length: int) -> tuple[int, int, tuple[int, ...]]:
        padded = math.ceil(length / multiple) * multiple
        size = min(tile, padded)
        if size >= padded:
            return padded, size, (0,)
        shared = min(overlap, size // 2)
        count = math.ceil((padded - shared) / (size - shared))
        step = (padded - size) / (count - 1)
        return padded, size, tuple(round(i * step) for i in range(count))

    canvas_w, tile_w, xs = axis(width)
    canvas_h, tile_h, ys = axis(height)
    return TileGrid((canvas_w, canvas_h), (tile_w, tile_h), xs, ys, min(overlap, tile_w // 2, tile_h // 2))


def pad_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` on a canvas of `size`, the extra rows and columns repeating its edge (no seam to draw)."""
    if image.size == size:
        return image
    array = np.asarray(image.convert("RGB"))
    pad_h, pad_w = size[1] - image.height, size[0] - image.width
    return Image.fromarray(np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge"))


class TileBlender:
    """Accumulates tiles with weights that ramp down over the overlap, so seams fade into each other."""

    def __init__(self, grid: TileGrid):
        self.grid = grid
        width, height = grid.canvas
        self.sum = np.zeros((height, width, 3), np.float64)
        self.weight = np.zeros((height, width, 1), np.float64)

    def add(self, box: tuple[int, int, int, int], tile: Image.Image) -> None:
        x0, y0, x1, y1 = box
        ramp_x = self._ramp(x1 - x0, x0 > 0, x1 < self.grid.canvas[0])
        ramp_y = self._ramp(y1 - y0, y0 > 0, y1 < self.grid.canvas[1])
        weight = (ramp_y[:, None] * ramp_x[None, :])[..., None]
        self.sum[y0:y1, x0:x1] += np.asarray(tile.convert("RGB"), np.float64) * weight
        self.weight[y0:y1, x0:x1] += weight

    def _ramp(self, length: int, fade_start: bool, fade_end: bool) -> np.ndarray:
        ramp = np.ones(length)
        width = max(1, self.grid.overlap)
        edge = (np.arange(width) + 0.5) / width  # never 0: every pixel keeps some weight
        if fade_start:
            ramp[:width] = np.minimum(ramp[:width], edge)
        if fade_end:
            ramp[-width:] = np.minimum(ramp[-width:], edge[::-1])
        return ramp

    def image(self, size: tuple[int, int]) -> Image.Image:
        pixels = np.clip(np.rint(self.sum / self.weight), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels).crop((0, 0, *size))
