"""GPU lease: hand the GPU between this server and a local LLM server (issue 6).

Usage by the application (which owns the engine and the idle timer):
- start-up: `lease = GpuLease(load_yaml_model(path, LeaseConfig, missing_ok=True))`, then
  `lease.recover()` (wakes an LLM a crashed holder left asleep) and
  `install_signal_handlers(lease, on_shutdown=free_engine_vram)`;
- before the engine goes on the GPU: `lease.acquire("generate", need_gb=...)`;
- after the engine offloaded/unloaded (idle timer, config.idle_release_s): `lease.release()`;
- any time: `lease.status()` (a LeaseStatus; never raises).
"""

from mcp_sdxl.lease.backends import BACKENDS, LlmBackend, make_backend
from mcp_sdxl.lease.hooks import install_signal_handlers
from mcp_sdxl.lease.http import BackendError
from mcp_sdxl.lease.manager import GpuLease, LeaseStatus
from mcp_sdxl.lease.record import LeaseRecord
from mcp_sdxl.lease.vram import NvmlReader, VramInfo

__all__ = [
    "BACKENDS",
    "BackendError",
    "GpuLease",
    "LeaseRecord",
    "LeaseStatus",
    "LlmBackend",
    "NvmlReader",
    "VramInfo",
    "install_signal_handlers",
    "make_backend",
]
