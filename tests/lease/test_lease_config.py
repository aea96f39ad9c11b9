from pathlib import Path

import pytest

from mcp_sdxl.config.lease import LeaseConfig, default_runtime_dir
from mcp_sdxl.config.loader import load_yaml_model
from mcp_sdxl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_yaml_is_valid_and_defaults_to_no_backend():
    cfg = load_yaml_model(ROOT / "configs" / "lease.yaml", LeaseConfig)
    assert cfg == LeaseConfig()  # the file documents the defaults, it does not change them
    assert cfg.llm.backend == "none"
    assert cfg.resolved_runtime_dir() == default_runtime_dir()


def test_backend_default_urls():
    assert LeaseConfig.model_validate({"llm": {"backend": "vllm"}}).llm.base_url == "http://127.0.0.1:8000"
    assert LeaseConfig.model_validate({"llm": {"backend": "ollama"}}).llm.base_url == "http://127.0.0.1:11434"
    cfg = LeaseConfig.model_validate({"llm": {"backend": "sglang", "url": "http://gpu-box:9000/"}})
    assert cfg.llm.base_url == "http://gpu-box:9000"


@pytest.mark.parametrize(
    "text, key",
    [
        ("llm: {backend: shell, shell_stop: 'true'}", "llm"),
        ("llm: {backend: mlx}", "llm.backend"),
        ("vram_need: 3", "vram_need"),
        ("llm: {vllm_sleep_level: 3}", "llm.vllm_sleep_level"),
        ("llm: {backend: vllm, url: 'localhost:8000'}", "llm"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, key):
    path = tmp_path / "lease.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_yaml_model(path, LeaseConfig)
    assert f"{path}: {key}" in str(err.value)
