"""Depth maps from a transformers depth-estimation model (Depth Anything, DPT, ...).

No depth weights ship in any package and the server never downloads them: the model must be a local
folder (config.json, weights, preprocessor_config.json) or a hub id already in the local Hugging Face
cache. Models load once per (source, device) and stay cached; loading is serialized by a lock so two
concurrent first calls do not load the same model twice.

Output follows the MiDaS convention the depth ControlNets were trained on: near = white, far = black,
min-max normalized per image. DPT and Depth Anything predict relative inverse depth, which is already
"bigger = nearer", so no inversion is needed.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from PIL import Image

from mcp_sdxl.errors import UserInputError

from .images import ResizeMode, check_size, fit_image, to_rgb

_lock = threading.Lock()
_cache: dict[tuple[str, str], tuple[object, object]] = {}


def no_depth_model_error(detail: str = "") -> UserInputError:
    reason = f" ({detail})" if detail else ""
    return UserInputError(
        f"No depth estimation model is available{reason}. Pass a ready depth map with preprocess=false, "
        "or configure preprocessing.depth.model in controlnet_config.yaml: a local folder with a "
        "transformers depth model (e.g. a downloaded depth-anything/Depth-Anything-V2-Small-hf) or a hub "
        "id already in the local Hugging Face cache.")


def _resolve(source: str) -> str:
    """The local folder holding the model: `source` itself, or a hub id's snapshot in the local cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path.resolve())
    looks_like_hub_id = (source.count("/") == 1 and not source.startswith((".", "/", "~"))
                         and "\\" not in source)
    if not looks_like_hub_id:
        raise no_depth_model_error(f"folder not found: {source}")
    # Resolve the cache folder ourselves: transformers' from_pretrained(hub_id, local_files_only=True)
    # still sends a HEAD request for adapter_config.json (a ~23 s retry loop when offline).
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, local_files_only=True)
    except OSError as exc:  # LocalEntryNotFoundError is an OSError
        raise no_depth_model_error(f"{source!r} is not in the local Hugging Face cache") from exc


def require_depth_model(source: str | None) -> str:
    """The local folder of the configured depth model, or the error a call would end with: checked
    before a call queues or takes the GPU (loads nothing)."""
    if not source:
        raise no_depth_model_error("preprocessing.depth.model is not set")
    return _resolve(source)


def load_depth_model(source: str, device: str = "cpu") -> tuple[object, object]:
    """(image_processor, model) for `source`, loaded offline-only and cached."""
    key = (_resolve(source), device)
    with _lock:
        if key not in _cache:
            # Imported here: transformers takes seconds to import and most calls never need depth.
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation

            try:
                # local_files_only: never reach for the hub (it is unreachable here and, on user
                # machines, a silent download inside a tool call is worse than a clear error).
                processor = AutoImageProcessor.from_pretrained(key[0], local_files_only=True)
                model = AutoModelForDepthEstimation.from_pretrained(key[0], local_files_only=True)
            except (OSError, ValueError) as exc:
                raise no_depth_model_error(f"could not load {source!r}: {str(exc).splitlines()[0]}") from exc
            _cache[key] = (processor, model.to(device).eval())
        return _cache[key]


def clear_depth_cache() -> None:
    """Drop cached depth models (frees their memory; the next call reloads)."""
    with _lock:
        _cache.clear()


def estimate_depth(image: Image.Image, source: str | None, *, device: str = "cpu") -> Image.Image:
    """Grayscale-as-RGB depth map of `image` at the image's own size."""
    if not source:
        raise no_depth_model_error("preprocessing.depth.model is not set")
    import torch  # lazy: importing torch costs seconds, and only depth estimation needs it here

    processor, model = load_depth_model(source, device)
    rgb = to_rgb(image)
    inputs = processor(images=rgb, return_tensors="pt").to(device)
    with torch.inference_mode():
        predicted = model(**inputs).predicted_depth  # (1, h, w) at the model's input resolution
    depth = torch.nn.functional.interpolate(predicted[:, None].float(), size=(rgb.height, rgb.width),
                                            mode="bicubic", align_corners=False)[0, 0].cpu().numpy()
    lo, hi = float(depth.min()), float(depth.max())
    norm = (depth - lo) / (hi - lo) if hi > lo else np.zeros_like(depth)
    gray = (norm * 255.0).clip(0, 255).round().astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def depth_map(image: Image.Image, width: int, height: int, *, model: str | None, device: str = "cpu",
              resize_mode: ResizeMode = "crop") -> Image.Image:
    """Depth map of `image` fitted to (width, height): estimated at the photo's size, then fitted."""
    check_size(width, height)
    return fit_image(estimate_depth(image, model, device=device), width, height, resize_mode,
                     Image.Resampling.BILINEAR)
