"""One call that lays out a complete offline model root: tiny pipeline, LoRAs, ControlNets, single file."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from pathlib import Path

from ._atomic import STAMP_KEY, build_file_once, stamp
from .controlnet import build_tiny_controlnet
from .lora import build_tiny_lora
from .pipeline import FORMAT_VERSION, build_tiny_sdxl, built_stamp
from .single_file import save_single_file

TINY_DIR_NAME = "sdxl-tiny"
# What the project's demo configuration refers to (usable as ensure_tiny_assets(root, DEMO_LORAS, ...)).
DEMO_LORAS: dict[str, dict] = {
    "loras/luca_character.safetensors": {"fmt": "diffusers"},
    "loras/portorosso_background.safetensors": {"fmt": "kohya"},
    "loras/pixar_style.safetensors": {"fmt": "kohya", "text_encoder": True},
}
DEMO_CONTROLNETS: dict[str, str] = {
    "openpose": "controlnets/openpose",
    "depth": "controlnets/depth",
    "canny": "controlnets/canny",
}


def path_seed(name: str) -> int:
    """A stable per-asset seed (crc32 of its name): the same path always gets the same weights."""
    return zlib.crc32(name.encode("utf-8"))


def ensure_tiny_assets(
    root: Path | str,
    lora_files: Mapping[str, Mapping] | None = None,
    controlnet_dirs: Mapping[str, Path | str] | None = None,
    single_file: str | None = None,
    seed: int = 0,
) -> Path:
    """Build (once) `root/sdxl-tiny/` and the requested derived assets; return the tiny pipeline folder.

    lora_files: relative path -> options for build_tiny_lora (fmt, text_encoder, rank; optional seed,
        default crc32 of the path). controlnet_dirs: name (openpose, depth, ...) -> folder, relative to
        `root` unless absolute; seeded by crc32 of the name. single_file: optional relative path of a
        Civitai-style checkpoint of the tiny pipeline. Safe to call from several processes at once: each
        asset is built under its own file lock and renamed into place complete.
    """
    root = Path(root)
    base = ensure_tiny_model(root, seed=seed)
    for relative, options in (lora_files or {}).items():
        options = dict(options)
        build_tiny_lora(base, root / relative, seed=options.pop("seed", path_seed(relative)), **options)
    for name, folder in (controlnet_dirs or {}).items():
        build_tiny_controlnet(base, root / folder, seed=path_seed(name))  # root / absolute == absolute
    if single_file:
        ensure_single_file(base, root / single_file)
    return base


def tiny_model_dir(root: Path | str) -> Path:
    return Path(root) / TINY_DIR_NAME


def ensure_tiny_model(root: Path | str, seed: int = 0) -> Path:
    """`root/sdxl-tiny/`, built once."""
    return build_tiny_sdxl(tiny_model_dir(root), seed=seed)


def ensure_tiny_controlnet(root: Path | str, kind: str) -> Path:
    """`root/controlnets/<kind>/` (openpose, depth, canny, ...), built once; same layout as DEMO_CONTROLNETS."""
    return build_tiny_controlnet(ensure_tiny_model(root), Path(root) / "controlnets" / kind, seed=path_seed(kind))


def ensure_single_file(base_dir: Path, dest_file: Path) -> Path:
    """Idempotent single-file checkpoint of a built tiny folder."""
    wanted = stamp(kind="single-file", format=FORMAT_VERSION, base=built_stamp(base_dir))
    return build_file_once(dest_file, wanted, lambda tmp: save_single_file(base_dir, tmp, metadata={STAMP_KEY: wanted}))
