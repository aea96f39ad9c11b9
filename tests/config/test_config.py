"""Config files load into pydantic models; bad files give one message naming file, key and problem."""

from __future__ import annotations

import pytest
import yaml

from mcp_sdxl.config import load_settings
from mcp_sdxl.errors import ConfigError
from tests.conftest import CONFIGS


def test_shipped_configs_load_with_seed_values(tmp_path):
    settings = load_settings(CONFIGS, home=tmp_path)
    presets = settings.sdxl.generation.quality_presets
    assert (presets["draft"].steps, presets["draft"].cfg_scale) == (20, 7.0)
    assert (presets["standard"].steps, presets["standard"].cfg_scale) == (30, 7.5)
    assert (presets["high"].steps, presets["high"].cfg_scale) == (40, 8.0)
    assert settings.sdxl.generation.default_size == (1024, 1024)
    assert settings.sdxl.generation.scheduler == "DPMSolverMultistepScheduler"
    assert settings.sdxl.attention.backend == "sdpa" and not settings.sdxl.attention.enable_xformers
    assert set(settings.loras.characters) == {"luca", "alberto"}
    assert settings.loras.backgrounds["portorosso"].default_weight == 0.6
    assert settings.presets["luca"].lora_weight == 0.85
    assert settings.controlnet.preprocessing.canny.low_threshold == 100
    assert settings.controlnet.controlnets["openpose"].model == "thibaud/controlnet-openpose-sdxl-1.0"


def test_relative_paths_resolve_against_models_root(tmp_path):
    settings = load_settings(CONFIGS, home=tmp_path / "h", models_root=tmp_path / "m")
    assert settings.model_path("loras/x.safetensors") == (tmp_path / "m" / "loras/x.safetensors").resolve()
    assert settings.model_path("/abs/x.safetensors").as_posix() == "/abs/x.safetensors"
    assert settings.output_dir == (tmp_path / "h" / "outputs").resolve()


def test_models_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MCP_SDXL_MODELS", str(tmp_path / "models"))
    settings = load_settings(CONFIGS, home=tmp_path)
    assert settings.models_root == (tmp_path / "models").resolve()


def _edit(config_dir, name, change):
    path = config_dir / name
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "name, change, expected",
    [
        ("sdxl_config.yaml", lambda d: d["attention"].update(enable_xformers=True), "attention.enable_xformers"),
        ("sdxl_config.yaml", lambda d: d["generation"]["quality_presets"]["draft"].update(steps=0), "quality_presets.draft.steps"),
        ("sdxl_config.yaml", lambda d: d["hardware"].update(dtype="float8"), "hardware.dtype"),
        ("sdxl_config.yaml", lambda d: d.update(typo_key=1), "typo_key"),
        ("lora_registry.yaml", lambda d: d["characters"]["luca"].update(default_weight=1.5), "characters.luca.default_weight"),
        ("lora_registry.yaml", lambda d: d["styles"]["pixar_3d"].pop("lora_path"), "styles.pixar_3d.lora_path"),
        ("character_presets.yaml", lambda d: d["luca"].update(lora_name="nobody"), "luca.lora_name"),
        ("controlnet_config.yaml", lambda d: d["preprocessing"]["canny"].update(low_threshold=300), "canny.low_threshold"),
        ("sdxl_config.yaml", lambda d: d["performance"].update(graphs_keep="some"), "performance.graphs_keep"),
    ],
)
def test_bad_config_names_file_and_key(config_dir, tmp_path, name, change, expected):
    path = _edit(config_dir, name, change)
    with pytest.raises(ConfigError) as err:
        load_settings(config_dir, home=tmp_path)
    message = str(err.value)
    assert str(path) in message
    assert expected in message


def test_invalid_yaml_is_reported(config_dir, tmp_path):
    (config_dir / "sdxl_config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="sdxl_config.yaml: not valid YAML"):
        load_settings(config_dir, home=tmp_path)


def test_missing_config_folder(tmp_path):
    with pytest.raises(ConfigError, match="config folder not found"):
        load_settings(tmp_path / "nope", home=tmp_path)


@pytest.mark.parametrize(("keep", "cap", "one_kind"), [
    ("auto", None, False), ("auto", 15.5, True), ("one_kind", None, True), ("every_kind", 15.5, False)])
def test_graphs_keep_decides_how_many_kinds_of_graphs_stay(config_dir, tmp_path, keep, cap, one_kind):
    """performance.graphs_keep: auto keeps one kind of call's CUDA graphs under a VRAM cap (or on a small
    card), every kind otherwise; the explicit values win over the cap."""
    from mcp_sdxl.engine import Engine

    def change(d):
        d["performance"]["graphs_keep"] = keep
        d["hardware"]["vram_limit_gb"] = cap

    _edit(config_dir, "sdxl_config.yaml", change)
    engine = Engine(load_settings(config_dir, home=tmp_path, profile="tiny"))
    assert engine._memory_is_tight() is one_kind
