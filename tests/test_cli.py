"""The command line: doctor, enroll, build-tiny and config errors, each as a real subprocess."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml


def _cli(*args, home, config_dir, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "mcp_sdxl", *args, "--home", str(home), "--config-dir", str(config_dir)],
        capture_output=True, text=True, timeout=timeout,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(home)},
    )


def _astronaut() -> Path:
    spec = importlib.util.find_spec("skimage")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "astronaut.png"


def test_doctor_reports_what_it_finds(home, config_dir):
    run = _cli("doctor", home=home, config_dir=config_dir)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "torch" in out and "diffusers" in out
    assert "SDXL weights: NOT FOUND: stabilityai/stable-diffusion-xl-base-1.0" in out
    assert "profile:      tiny" in out
    assert "luca" in out and "MISSING" in out  # the registry's LoRA files are not on this machine
    assert "face backend: sface" in out
    assert "GPU lease:    LLM backend none" in out


def test_enroll_adds_references(home, config_dir):
    run = _cli("enroll", "luca", str(_astronaut()), home=home, config_dir=config_dir)
    assert run.returncode == 0, run.stderr
    stored = Path(run.stdout.strip().splitlines()[-1])
    assert stored.is_file() and "luca" in stored.parts and "sface" in stored.parts
    vector = np.load(stored)
    assert vector.shape == (128,) and abs(np.linalg.norm(vector) - 1) < 1e-3

    bad = _cli("enroll", "nemo", str(_astronaut()), home=home, config_dir=config_dir)
    assert bad.returncode == 1 and "valid characters: alberto, luca" in bad.stderr


def test_config_error_is_one_clear_message(home, config_dir):
    path = config_dir / "lora_registry.yaml"
    data = yaml.safe_load(path.read_text())
    data["characters"]["luca"]["default_weight"] = 2
    path.write_text(yaml.safe_dump(data))
    run = _cli("doctor", home=home, config_dir=config_dir)
    assert run.returncode == 2
    assert f"{path}: characters.luca.default_weight" in run.stderr


def test_profile_sdxl_without_weights_refuses_to_start(home, config_dir):
    run = subprocess.run(
        [sys.executable, "-m", "mcp_sdxl", "serve", "--profile", "sdxl", "--home", str(home), "--config-dir", str(config_dir)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(home)},
    )
    assert run.returncode == 2
    assert "SDXL weights" in run.stderr and "profile: tiny" in run.stderr


def test_http_address_forms():
    import argparse

    from mcp_sdxl.cli import _parse_http

    assert _parse_http("127.0.0.1:8765") == ("127.0.0.1", 8765)
    assert _parse_http(":9000") == ("127.0.0.1", 9000)
    assert _parse_http("[::1]:8812") == ("::1", 8812)  # IPv6 as URLs write it
    assert _parse_http("::1:8812") == ("::1", 8812)
    with pytest.raises(argparse.ArgumentTypeError, match=r"\[::1\]:8765"):
        _parse_http("localhost")
