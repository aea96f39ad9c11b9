"""ControlNet control maps (pose skeleton, depth, canny edges) from reference images or pose presets.

Pure functions on PIL images. `prepare_control` is the one entry point the engine calls; the modules
below it can be used on their own (and are, by the tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from PIL import Image

from mcp_sdxl.errors import UserInputError

from .canny import canny_map
from .depth import clear_depth_cache, depth_map, estimate_depth, load_depth_model
from .images import RESIZE_MODES, Fit, ResizeMode, check_size, prepare_ready_map
from .openpose import BODY_POINTS, PoseKeypoints, render_openpose
from .pose_detect import PoseBackend, detect_pose
from .pose_presets import default_presets_dir, list_pose_presets, render_pose_preset

ControlKind = Literal["pose", "depth", "canny"]
CONTROL_KINDS: tuple[str, ...] = ("pose", "depth", "canny")

__all__ = [
    "BODY_POINTS",
    "CONTROL_KINDS",
    "RESIZE_MODES",
    "PoseKeypoints",
    "PreprocessSettings",
    "canny_map",
    "clear_depth_cache",
    "default_presets_dir",
    "depth_map",
    "detect_pose",
    "estimate_depth",
    "list_pose_presets",
    "load_depth_model",
    "pose_map",
    "prepare_control",
    "prepare_ready_map",
    "render_openpose",
    "render_pose_preset",
]


@dataclass(frozen=True)
class PreprocessSettings:
    """Preprocessing knobs; `from_mapping` also reads controlnet_config.yaml's `preprocessing` section."""

    canny_low: int = 100
    canny_high: int = 200
    detect_hands: bool = True
    detect_face: bool = True
    pose_backend: PoseBackend = "auto"
    annotator_dir: str | None = None  # controlnet_aux OpenPose weights folder
    depth_model: str | None = None  # local folder or cached hub id of a transformers depth model
    depth_device: str = "cpu"  # the GPU belongs to SDXL; a small depth model is fast enough on CPU
    resize_mode: ResizeMode = "crop"
    presets_dir: str | None = None  # default: the repository's configs/poses

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> PreprocessSettings:
        """Flat keys (the field names) or the nested YAML shape {openpose: {...}, depth: {...}, canny: {...}}."""
        flat = dict(data or {})
        nested = {"openpose": {"detect_hands": "detect_hands", "detect_face": "detect_face",
                               "annotator_dir": "annotator_dir", "backend": "pose_backend"},
                  "depth": {"model": "depth_model", "device": "depth_device", "model_type": None},
                  "canny": {"low_threshold": "canny_low", "high_threshold": "canny_high"}}
        for section, keys in nested.items():
            sub = flat.pop(section, None) or {}
            for key, value in dict(sub).items():
                if key not in keys:
                    raise UserInputError(f"preprocessing.{section}: unknown key {key!r}; valid: {', '.join(keys)}")
                if keys[key] is not None:  # model_type is the legacy MiDaS name: informational only
                    flat[keys[key]] = value
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(flat) - valid)
        if unknown:
            raise UserInputError(f"unknown preprocessing setting(s) {', '.join(unknown)}; "
                                 f"valid: {', '.join(sorted(valid))}")
        return cls(**flat)


def pose_map(image: Image.Image, width: int, height: int, settings: PreprocessSettings) -> Image.Image:
    """Detect the pose in `image` and draw it as an OpenPose skeleton at (width, height).

    Keypoints are mapped through the same fit as the photo would be, then drawn at the target size:
    sharper than drawing at the photo's size and resizing the drawing.
    """
    check_size(width, height)
    people = detect_pose(image, hands=settings.detect_hands, face=settings.detect_face,
                         backend=settings.pose_backend, annotator_dir=settings.annotator_dir)
    fit = Fit.compute(image.width, image.height, width, height, settings.resize_mode)
    placed = [p.mapped(lambda pt: fit.map_point(pt[0], pt[1], image.width, image.height)) for p in people]
    return render_openpose(placed, width, height, hands=settings.detect_hands, face=settings.detect_face)


def prepare_control(kind: ControlKind, image: Image.Image | None, *, preprocess: bool, width: int, height: int,
                    settings: PreprocessSettings | Mapping[str, Any] | None = None,
                    pose_preset: str | None = None) -> Image.Image:
    """The control map for one ControlNet, RGB at exactly (width, height).

    preprocess=True turns a reference photo into the map (pose detection, depth estimation, Canny);
    preprocess=False takes `image` as a ready map and only converts and fits it. For kind="pose",
    `pose_preset` names a preset from configs/poses instead of an image.
    """
    if kind not in CONTROL_KINDS:
        raise UserInputError(f"control kind must be one of {', '.join(CONTROL_KINDS)}, got {kind!r}")
    check_size(width, height)
    s = settings if isinstance(settings, PreprocessSettings) else PreprocessSettings.from_mapping(settings)
    if pose_preset is not None:
        if kind != "pose":
            raise UserInputError(f"pose_preset only applies to pose control, not {kind}")
        if image is not None:
            raise UserInputError("Give either a pose reference image or a pose_preset, not both.")
        return render_pose_preset(pose_preset, width, height, s.presets_dir)
    if image is None:
        hint = " or a pose_preset (see the list of pose presets)" if kind == "pose" else ""
        raise UserInputError(f"{kind} control needs a reference image{hint}.")
    if not preprocess:
        return prepare_ready_map(image, width, height, s.resize_mode)
    if kind == "canny":
        return canny_map(image, width, height, low=s.canny_low, high=s.canny_high, resize_mode=s.resize_mode)
    if kind == "depth":
        return depth_map(image, width, height, model=s.depth_model, device=s.depth_device,
                         resize_mode=s.resize_mode)
    return pose_map(image, width, height, s)
