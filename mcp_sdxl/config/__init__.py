"""Configuration: the YAML files in configs/ validated into pydantic models, plus resolved folders.

Where things live:
- config dir: MCP_SDXL_CONFIG or --config-dir (default: the repo's configs/).
- data home: MCP_SDXL_HOME or --home (default ~/.mcp-sdxl): outputs, inputs, references, runtime, tiny engine.
- models root: MCP_SDXL_MODELS or --models-root (default <home>/models): base for relative model paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mcp_sdxl.config.loader import load_yaml_model
from mcp_sdxl.config.models import (
    CharacterPreset,
    CharacterPresets,
    ControlNetConfig,
    LoraEntry,
    LoraRegistry,
    SDXLConfig,
)
from mcp_sdxl.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_DIR = PACKAGE_DIR.parent / "configs"


@dataclass
class Settings:
    config_dir: Path
    home: Path
    models_root: Path
    sdxl: SDXLConfig
    loras: LoraRegistry
    presets: dict[str, CharacterPreset]
    controlnet: ControlNetConfig
    lease: "LeaseConfig"  # noqa: F821 - defined in mcp_sdxl.config.lease
    consistency: "ConsistencyConfig"  # noqa: F821 - defined in mcp_sdxl.config.consistency

    # -- folders
    @property
    def output_dir(self) -> Path:
        return self.data_path(self.sdxl.server.output_dir)

    @property
    def input_dirs(self) -> list[Path]:
        return [self.data_path(p) for p in self.sdxl.server.input_dirs]

    @property
    def tiny_dir(self) -> Path:
        return self.home / "tiny"

    @property
    def poses_dir(self) -> Path:
        return self.config_dir / "poses"

    def data_path(self, value: str | os.PathLike) -> Path:
        path = Path(os.path.expanduser(str(value)))
        return path if path.is_absolute() else self.home / path

    def model_path(self, value: str) -> Path:
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else self.models_root / path

    def lora(self, kind: str, name: str) -> LoraEntry:
        return self.loras.kinds()[kind][name]


def load_settings(
    config_dir: str | os.PathLike | None = None,
    home: str | os.PathLike | None = None,
    models_root: str | os.PathLike | None = None,
    profile: str | None = None,
) -> Settings:
    """Load and cross-check every config file. Raises ConfigError naming the file and key."""
    from mcp_sdxl.config.consistency import ConsistencyConfig
    from mcp_sdxl.config.lease import LeaseConfig

    config_dir = Path(config_dir or os.environ.get("MCP_SDXL_CONFIG") or DEFAULT_CONFIG_DIR).expanduser()
    if not config_dir.is_dir():
        raise ConfigError(f"{config_dir}: config folder not found (set MCP_SDXL_CONFIG or --config-dir)")
    home = Path(home or os.environ.get("MCP_SDXL_HOME") or "~/.mcp-sdxl").expanduser().resolve()
    models_root = Path(models_root or os.environ.get("MCP_SDXL_MODELS") or home / "models").expanduser()

    sdxl = load_yaml_model(config_dir / "sdxl_config.yaml", SDXLConfig)
    profile = profile or os.environ.get("MCP_SDXL_PROFILE")
    if profile:
        if profile not in ("auto", "sdxl", "tiny"):
            raise ConfigError(f"profile {profile!r}: use auto, sdxl or tiny")
        sdxl.profile = profile  # type: ignore[assignment]
    loras = load_yaml_model(config_dir / "lora_registry.yaml", LoraRegistry)
    presets = load_yaml_model(config_dir / "character_presets.yaml", CharacterPresets).root
    controlnet = load_yaml_model(config_dir / "controlnet_config.yaml", ControlNetConfig)
    lease = load_yaml_model(config_dir / "lease.yaml", LeaseConfig, missing_ok=True)
    consistency = load_yaml_model(config_dir / "consistency.yaml", ConsistencyConfig, missing_ok=True)

    _check_cross_references(config_dir, sdxl, loras, presets)
    return Settings(config_dir, home, models_root.resolve(), sdxl, loras, presets, controlnet, lease, consistency)


def _check_cross_references(
    config_dir: Path, sdxl: SDXLConfig, loras: LoraRegistry, presets: dict[str, CharacterPreset]
) -> None:
    problems = []
    file = config_dir / "character_presets.yaml"
    for key, preset in presets.items():
        if preset.lora_name and preset.lora_name not in loras.characters:
            problems.append(
                f"{file}: {key}.lora_name: {preset.lora_name!r} is not a character in lora_registry.yaml "
                f"(known: {', '.join(sorted(loras.characters)) or 'none'})"
            )
        if preset.default_style and preset.default_style not in loras.styles:
            problems.append(
                f"{file}: {key}.default_style: {preset.default_style!r} is not a style in lora_registry.yaml "
                f"(known: {', '.join(sorted(loras.styles)) or 'none'})"
            )
    limits = sdxl.generation.limits
    for name, size in [("generation.default_size", sdxl.generation.default_size)] + [
        (f"{k}.generation_params.size", p.generation_params.size) for k, p in presets.items()
    ]:
        if size and not all(limits.min_size <= v <= limits.max_size and v % 8 == 0 for v in size):
            where = "sdxl_config.yaml" if name.startswith("generation") else "character_presets.yaml"
            problems.append(
                f"{config_dir / where}: {name}: {list(size)} must be multiples of 8 within "
                f"[{limits.min_size}, {limits.max_size}]"
            )
    if problems:
        raise ConfigError("\n".join(problems))
