"""Shared fixtures: a temporary data home per test, the tiny engine built once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch loads: on 2 cores, OpenMP's spinning threads made the tiny models 10-40x slower under xdist.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One tiny engine build (model, LoRAs, ControlNets) shared by every test of the session."""
    from mcp_sdxl.config import load_settings
    from mcp_sdxl.engine import tiny_profile

    home = tmp_path_factory.mktemp("tiny-home")
    settings = load_settings(CONFIGS, home=home, profile="tiny")
    tiny_profile.build_all(settings)
    return settings.tiny_dir


@pytest.fixture
def home(tmp_path, tiny_cache) -> Path:
    """A fresh data home whose tiny/ folder links to the session's tiny build."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "tiny").symlink_to(tiny_cache, target_is_directory=True)
    return home


@pytest.fixture
def config_dir(tmp_path) -> Path:
    """A writable copy of configs/ with a private lease folder (tests never share the real one)."""
    dest = tmp_path / "configs"
    shutil.copytree(CONFIGS, dest)
    set_yaml_key(dest / "lease.yaml", "runtime_dir", str(tmp_path / "runtime"))
    return dest


def set_yaml_key(path: Path, key: str, value) -> None:
    """Set a top-level key in a YAML config file (tests edit configs the way a user would)."""
    import yaml

    data = yaml.safe_load(path.read_text()) if path.exists() else {}
    data = data or {}
    data[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture
def settings(config_dir, home):
    from mcp_sdxl.config import load_settings

    return load_settings(config_dir, home=home, profile="tiny")


@pytest.fixture
def studio(settings):
    from mcp_sdxl.studio import Studio

    studio = Studio(settings)
    yield studio
    studio.close()
