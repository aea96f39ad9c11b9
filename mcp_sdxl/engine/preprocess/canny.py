"""Canny edge maps in the format SDXL canny ControlNets were trained on: white 1-px edges on black, RGB."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from mcp_sdxl.errors import UserInputError

from .images import ResizeMode, check_size, fit_image, to_rgb


def check_thresholds(low: int, high: int) -> None:
    # OpenCV accepts any non-negative pair (gradient magnitudes exceed 255), but the ControlNet world
    # (A1111, controlnet_aux, the config file) uses 0-255 with low <= high: keep callers on that scale.
    for name, value in (("low threshold", low), ("high threshold", high)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 255:
            raise UserInputError(f"canny {name} must be an integer from 0 to 255, got {value!r}")
    if low > high:
        raise UserInputError(f"canny low threshold ({low}) must not exceed the high threshold ({high})")


def canny_map(image: Image.Image, width: int, height: int, *, low: int = 100, high: int = 200,
              resize_mode: ResizeMode = "crop") -> Image.Image:
    """Edges of `image` at (width, height).

    The photo is fitted to the target size first so edges are 1 px wide at the resolution SDXL sees
    (resizing an edge map afterwards blurs or drops edges). Canny runs on the RGB array, as in the
    ControlNet training scripts: OpenCV takes the strongest gradient over the three channels.
    """
    check_size(width, height)
    check_thresholds(low, high)
    rgb = np.asarray(fit_image(to_rgb(image), width, height, resize_mode))
    edges = cv2.Canny(np.ascontiguousarray(rgb), low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))
