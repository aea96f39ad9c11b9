"""Fit images and normalized points onto the requested (width, height) control canvas.

The control map must match the generated image exactly, but reference photos rarely share its aspect
ratio. Three fits, as in the A1111 ControlNet UI:
- "crop":    scale to cover, cut the overflow evenly (default: nothing is distorted, the edges are lost);
- "pad":     scale to fit inside, fill the rest with black (black means "no control" in all three maps);
- "stretch": scale each axis on its own (distorts; for maps already made at the right aspect ratio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from mcp_sdxl.errors import UserInputError

ResizeMode = Literal["crop", "pad", "stretch"]
RESIZE_MODES: tuple[str, ...] = ("crop", "pad", "stretch")
MAX_SIDE = 8192  # larger canvases are a typo, not a request; SDXL itself tops out far below this


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or not 8 <= value <= MAX_SIDE:
            raise UserInputError(f"{name} must be an integer from 8 to {MAX_SIDE}, got {value!r}")


@dataclass(frozen=True)
class Fit:
    """Where a source image of (src_w, src_h) lands on a (width, height) canvas.

    scale_x/scale_y: source pixels -> canvas pixels; offset_x/offset_y: canvas position of the source's
    top-left corner (negative when cropping).
    """

    width: int
    height: int
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    @classmethod
    def compute(cls, src_w: int, src_h: int, width: int, height: int, mode: ResizeMode) -> Fit:
        if mode not in RESIZE_MODES:
            raise UserInputError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
        if mode == "stretch":
            return cls(width, height, width / src_w, height / src_h, 0.0, 0.0)
        pick = max if mode == "crop" else min
        s = pick(width / src_w, height / src_h)
        return cls(width, height, s, s, (width - src_w * s) / 2, (height - src_h * s) / 2)

    def map_point(self, x: float, y: float, src_w: int, src_h: int) -> tuple[float, float]:
        """Source-normalized (x, y) -> canvas-normalized (x, y); may fall outside [0, 1] after a crop."""
        cx = (x * src_w * self.scale_x + self.offset_x) / self.width
        cy = (y * src_h * self.scale_y + self.offset_y) / self.height
        return cx, cy


def fit_image(image: Image.Image, width: int, height: int, mode: ResizeMode = "crop",
              resample: Image.Resampling = Image.Resampling.LANCZOS) -> Image.Image:
    """Place `image` on a black (width, height) canvas according to `mode`."""
    fit = Fit.compute(image.width, image.height, width, height, mode)
    new_w = max(1, round(image.width * fit.scale_x))
    new_h = max(1, round(image.height * fit.scale_y))
    scaled = image if (new_w, new_h) == image.size else image.resize((new_w, new_h), resample)
    if (new_w, new_h) == (width, height):
        return scaled
    canvas = Image.new(scaled.mode, (width, height))  # zero-filled: black
    canvas.paste(scaled, (round(fit.offset_x), round(fit.offset_y)))
    return canvas


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, without surprises for control maps.

    Transparent areas become black (a skeleton drawn on a transparent layer means "no control" there), and
    16-bit / float depth maps are scaled by their own range instead of being clipped at 255.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.round().astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")


def prepare_ready_map(image: Image.Image, width: int, height: int, mode: ResizeMode = "crop") -> Image.Image:
    """A control map the caller made already (skeleton / depth / edges): RGB at exactly (width, height).

    Bilinear rather than Lanczos: Lanczos rings around thin skeleton lines and 1-pixel edges.
    """
    check_size(width, height)
    return fit_image(to_rgb(image), width, height, mode, Image.Resampling.BILINEAR)
