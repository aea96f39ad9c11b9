"""Fixtures for the GPU lease tests: fake LLM servers, configs in a temporary runtime folder,
scripted VRAM readers and helper processes that hold the lease."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lease_fakes import FakeOllama, FakeVllm, spawn

from mcp_sdxl.config.lease import LeaseConfig
from mcp_sdxl.lease.vram import VramInfo


@pytest.fixture
def make_config(tmp_path):
    def make(backend: str = "none", url: str | None = None, llm: dict | None = None, **top) -> LeaseConfig:
        top.setdefault("runtime_dir", str(tmp_path / "run"))
        top.setdefault("acquire_timeout_s", 2)
        top.setdefault("vram_wait_timeout_s", 2)
        return LeaseConfig.model_validate(
            {**top, "llm": {"backend": backend, "url": url, "timeout_s": 5, **(llm or {})}}
        )

    return make


@pytest.fixture
def vllm():
    fake = FakeVllm()
    yield fake
    fake.close()


@pytest.fixture
def ollama():
    fake = FakeOllama(["llama3.2:3b", "qwen2.5:7b"])
    yield fake
    fake.close()


class ScriptedVram:
    """A VRAM reader returning scripted free-memory figures (the last one repeats).
    It drives the lease's wait logic; it is not a stand-in for NVML itself."""

    def __init__(self, free: list[float], log: list | None = None, total: float = 80.0) -> None:
        self.free = list(free)
        self.log = log
        self.total = total
        self.reads = 0

    def __call__(self) -> VramInfo:
        value = self.free[min(self.reads, len(self.free) - 1)]
        self.reads += 1
        if self.log is not None:
            self.log.append(f"VRAM {value:g}")
        return VramInfo(total_gb=self.total, used_gb=self.total - value, free_gb=value)


@pytest.fixture
def scripted():
    return ScriptedVram


@pytest.fixture
def holder():
    """Start helper processes; every one still running is killed at the end."""
    procs: list[subprocess.Popen] = []

    def start(config: LeaseConfig, *args: str) -> subprocess.Popen:
        proc = spawn(config, *args)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
