"""GPU memory as the LLM server sees it: NVML (package nvidia-ml-py, module pynvml).

Read through NVML rather than torch: NVML counts every process on the device, and asking torch would
create a CUDA context in this process. Without NVML (no package, no driver: CPU machines) every
reading is None and the lease skips its VRAM waits; status() says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

GIB = 1024**3


class GpuProcess(BaseModel):
    pid: int
    name: str | None = None
    used_gb: float | None = None  # None when the driver hides it (some containers / WSL)


class VramInfo(BaseModel):
    total_gb: float
    used_gb: float
    free_gb: float
    processes: list[GpuProcess] = []


VramReader = Callable[[], "VramInfo | None"]


def _proc_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None  # pid from another PID namespace


class NvmlReader:
    """Callable VramReader for one device. Initialises NVML once, lazily; remembers why it failed."""

    def __init__(self, gpu_index: int = 0) -> None:
        self.gpu_index = gpu_index
        self.unavailable_reason: str | None = None
        self._handle = None
        self._nvml = None
        self._tried = False
        self._lock = threading.Lock()

    def _init(self) -> None:
        self._tried = True
        try:
            import pynvml  # optional dependency: nvidia-ml-py
        except ImportError:
            self.unavailable_reason = "NVML unavailable: package nvidia-ml-py is not installed"
            return
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.gpu_index)
        except pynvml.NVMLError as exc:
            self.unavailable_reason = f"NVML unavailable: {exc}"
            return
        self._nvml = pynvml

    def __call__(self) -> VramInfo | None:
        with self._lock:
            if not self._tried:
                self._init()
            if self._nvml is None:
                return None
            nv = self._nvml
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(self._handle)
            except nv.NVMLError as exc:
                self.unavailable_reason = f"NVML read failed: {exc}"
                return None
            processes: list[GpuProcess] = []
            try:
                for p in nv.nvmlDeviceGetComputeRunningProcesses(self._handle):
                    used = getattr(p, "usedGpuMemory", None)
                    processes.append(
                        GpuProcess(pid=p.pid, name=_proc_name(p.pid), used_gb=None if used is None else used / GIB)
                    )
            except nv.NVMLError:
                pass  # per-process figures are a bonus; totals are what the waits need
            return VramInfo(
                total_gb=mem.total / GIB, used_gb=mem.used / GIB, free_gb=mem.free / GIB, processes=processes
            )


def wait_for_free(
    reader: VramReader, need_gb: float, timeout_s: float, poll_s: float = 0.25
) -> tuple[bool | None, VramInfo | None]:
    """Poll until free VRAM >= need_gb. Returns (True, info) when reached, (False, last info) on
    timeout, (None, None) when VRAM cannot be read (wait skipped)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = reader()
        if info is None:
            return None, None
        if info.free_gb >= need_gb:
            return True, info
        if time.monotonic() >= deadline:
            return False, info
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def describe(info: VramInfo | None) -> str:
    if info is None:
        return "VRAM unknown"
    text = f"free {info.free_gb:.1f} of {info.total_gb:.1f} GiB"
    users = [p for p in info.processes if p.used_gb]
    if users:
        users.sort(key=lambda p: p.used_gb or 0, reverse=True)
        text += "; using it: " + ", ".join(f"pid {p.pid} {p.name or '?'} {p.used_gb:.1f} GiB" for p in users[:4])
    return text
