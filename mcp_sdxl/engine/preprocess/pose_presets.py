"""Named poses from configs/poses/*.yaml, rendered as OpenPose skeletons at any size.

A preset lists the 18 OpenPose body points by name as [x, y] in [0, 1] (y downwards) or null when not
visible. Presets are drawn in a square frame, but only their shape matters: rendering scales the body's
bounding box uniformly (never stretched) to fill the canvas height or width minus a margin, centered,
so a standing pose fills a portrait canvas and still looks right on a landscape one.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from PIL import Image

from mcp_sdxl.errors import ConfigError, NotFoundError

from .images import check_size
from .openpose import BODY_POINTS, PoseKeypoints, render_openpose

MARGIN = 0.08  # fraction of the canvas kept free on each side, so hands and feet are not cut off


def default_presets_dir() -> Path:
    """The repository's configs/poses (this file is mcp_sdxl/engine/preprocess/pose_presets.py)."""
    return Path(__file__).resolve().parents[3] / "configs" / "poses"


def list_pose_presets(presets_dir: str | Path | None = None) -> list[str]:
    folder = Path(presets_dir) if presets_dir is not None else default_presets_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_pose_preset(name: str, presets_dir: str | Path | None = None) -> PoseKeypoints:
    """Body keypoints of preset `name` in its own normalized frame."""
    folder = Path(presets_dir) if presets_dir is not None else default_presets_dir()
    names = list_pose_presets(folder)
    if name not in names:  # also rejects path tricks such as "../x": only listed stems are accepted
        raise NotFoundError(f"Unknown pose preset {name!r}. Available: {', '.join(names) or 'none'}.")
    path = folder / f"{name}.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    points = data.get("keypoints") if isinstance(data, dict) else None
    if not isinstance(points, dict):
        raise ConfigError(f"{path}: keypoints: must be a mapping of OpenPose point names to [x, y] or null")
    unknown = sorted(set(points) - set(BODY_POINTS))
    if unknown:
        raise ConfigError(f"{path}: keypoints: unknown point(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(BODY_POINTS)}")
    body: list[tuple[float, float] | None] = []
    for key in BODY_POINTS:
        value = points.get(key)
        if value is None:
            body.append(None)
            continue
        ok = (isinstance(value, list) and len(value) == 2
              and all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in value))
        if not ok:
            raise ConfigError(f"{path}: keypoints.{key}: must be [x, y] with both in [0, 1] or null, got {value!r}")
        body.append((float(value[0]), float(value[1])))
    if sum(p is not None for p in body) < 2:
        raise ConfigError(f"{path}: keypoints: at least two points must be visible")
    return PoseKeypoints(body)


def fit_to_canvas(person: PoseKeypoints, width: int, height: int, margin: float = MARGIN) -> PoseKeypoints:
    """Scale the body's bounding box uniformly (in pixels) into the canvas minus margins, centered."""
    pts = [p for p in person.body if p is not None]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    box_w, box_h = max(x1 - x0, 1e-6), max(y1 - y0, 1e-6)
    scale = min(width * (1 - 2 * margin) / box_w, height * (1 - 2 * margin) / box_h)  # pixels per unit
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return person.mapped(lambda p: (0.5 + (p[0] - cx) * scale / width, 0.5 + (p[1] - cy) * scale / height))


def render_pose_preset(name: str, width: int, height: int, presets_dir: str | Path | None = None) -> Image.Image:
    """OpenPose skeleton image (RGB, black background) of preset `name` at (width, height)."""
    check_size(width, height)
    person = load_pose_preset(name, presets_dir)
    return render_openpose([fit_to_canvas(person, width, height)], width, height)
