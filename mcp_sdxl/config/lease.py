"""Settings of the GPU lease (configs/lease.yaml): who frees the GPU for us and how long we wait.

The lease hands one GPU back and forth between this server and a local LLM server. These settings
name the LLM server's kind and address, and the limits of each wait. Defaults are safe on a machine
without an LLM server (backend `none`) and without a GPU (VRAM waits are skipped without NVML).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BackendKind = Literal["none", "vllm", "ollama", "sglang", "llama_swap", "shell"]

# Where each server listens by default, so `url` may be left out in the common case.
DEFAULT_URLS: dict[str, str] = {
    "vllm": "http://127.0.0.1:8000",
    "ollama": "http://127.0.0.1:11434",
    "sglang": "http://127.0.0.1:30000",
    "llama_swap": "http://127.0.0.1:8080",
}


class LlmConfig(BaseModel):
    """The LLM server that must give the GPU up while we generate."""

    model_config = ConfigDict(extra="forbid")

    backend: BackendKind = "none"
    url: str | None = None  # None: the backend's usual local address (DEFAULT_URLS)
    timeout_s: float = Field(60.0, gt=0)  # each HTTP call / shell command; vLLM sleep copies weights
    status_timeout_s: float = Field(2.0, gt=0)  # status() must answer fast even when the LLM hangs
    unload_timeout_s: float = Field(30.0, gt=0)  # Ollama / llama-swap unload asynchronously: poll this long
    warmup: bool = True  # 1-token request after wake so the user's first request is not the slow one
    warmup_model: str | None = None  # None: the first model the server lists (/v1/models)
    vllm_sleep_level: Literal[1, 2] = 1  # 1: weights to CPU RAM (fast wake); 2: weights dropped
    vllm_reload_weights: bool = True  # after level 2: collective_rpc reload_weights + reset_prefix_cache
    ollama_reload_keep_alive: str | None = None  # e.g. "10m": reload the models we unloaded; None: lazy
    shell_stop: str | None = None  # backend shell: /bin/sh command that frees the GPU
    shell_start: str | None = None  # backend shell: /bin/sh command that brings the LLM back

    @model_validator(mode="after")
    def _check(self) -> LlmConfig:
        if self.backend == "shell" and not (self.shell_stop and self.shell_start):
            raise ValueError("backend 'shell' needs both shell_stop and shell_start commands")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        return self

    @property
    def base_url(self) -> str:
        return (self.url or DEFAULT_URLS.get(self.backend, "")).rstrip("/")


class LeaseConfig(BaseModel):
    """configs/lease.yaml."""

    model_config = ConfigDict(extra="forbid")

    owner: str = "mcp-sdxl"  # shown to whoever waits for the GPU
    runtime_dir: Path | None = None  # lock + record; None: default_runtime_dir(); relative: caller resolves
    gpu_index: int = Field(0, ge=0)  # NVML device index whose memory we watch
    acquire_timeout_s: float = Field(120.0, ge=0)  # wait for another holder of the lease
    lease_ttl_s: float = Field(900.0, gt=0)  # advisory expiry shown to waiters; renew() extends it
    idle_release_s: float = Field(300.0, ge=0)  # for the application's idle timer (0: release after each job)
    vram_need_gb: float = Field(12.0, ge=0)  # free VRAM (NVML) needed before acquire returns
    vram_wait_timeout_s: float = Field(60.0, ge=0)  # bounded wait for VRAM, both ways
    vram_release_slack_gb: float = Field(1.0, ge=0)  # our CUDA context stays until exit; tolerate it
    llm: LlmConfig = Field(default_factory=LlmConfig)

    def resolved_runtime_dir(self) -> Path:
        return Path(self.runtime_dir) if self.runtime_dir is not None else default_runtime_dir()


def default_runtime_dir() -> Path:
    """A per-user folder that every process of this user finds, whatever its environment.

    /run/user/UID is used directly rather than $XDG_RUNTIME_DIR, because a systemd service and a login
    shell of the same user may differ in that variable, and two processes looking at different folders
    would both think they hold the GPU.
    """
    uid = os.getuid()
    run_user = Path(f"/run/user/{uid}")
    if run_user.is_dir() and os.access(run_user, os.W_OK):
        return run_user / "mcp-sdxl"
    return Path(f"/tmp/mcp-sdxl-{uid}")
