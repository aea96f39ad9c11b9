"""Compile a module's forward in a background thread, one call signature at a time (`compile: full`).

A full `torch.compile` of the SDXL UNet is the fastest step measured (31.7 ms against 39.8 ms for the
regional compile on an H200, docs/bench/), but its first call takes minutes (135 s with a cold cache). Run
on the caller's thread, that blocks the first image behind the compile. Here the GraphRunner keeps serving
every signature with the plain forward (replayed as a CUDA graph) and hands the signature to this
compiler; one background thread runs the compiled function once on a copy of the arguments (that call is
where dynamo and inductor compile), and from the next call on that signature runs compiled. The caller's
thread never calls the compiled function for a signature the background has not finished, so it never
compiles itself.

While a compile runs, no CUDA graph is captured anywhere in the pipeline (a capture while another thread
launches kernels is unsafe); graphs captured before go on replaying. `wait()` lets the engine finish a
compile before it moves weights (offload, unload).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Callable

import torch

from mcp_sdxl.engine.cuda_graphs import _unflatten

log = logging.getLogger(__name__)

SERVING_SWITCH_INTERVAL_S = 0.00005
OOM_ATTEMPTS = 2  # a compile run that ran out of memory is tried again once (the next time the call comes)


class _ShortSwitchInterval:
    """The GIL switch interval is process-wide: short while any compile runs, restored when the last ends.

    The compile is Python that holds the GIL; the serving thread gives the GIL up in most torch calls and
    waits up to one switch interval (5 ms) to get it back each time: a 30 ms UNet step took ~0.5 s while
    the UNet compiled (H200). At 50 us the serving thread's CPU work per step stays under the GPU's time.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._running = 0
        self._saved = None

    def __enter__(self):
        with self._lock:
            if self._running == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(SERVING_SWITCH_INTERVAL_S)
            self._running += 1

    def __exit__(self, *exc):
        with self._lock:
            self._running -= 1
            if self._running == 0:
                sys.setswitchinterval(self._saved)


_short_switch_interval = _ShortSwitchInterval()


class BackgroundCompiler:
    def __init__(self, compiled: Callable, *, name: str):
        self.compiled = compiled  # torch.compile(forward): compiles on its first call for each signature
        self.name = name
        self.ready: dict[Any, int] = {}  # signature -> the weights' structure version it was compiled at
        self.failed: set = set()
        self._oom: dict = {}  # signature -> compile runs that ran out of GPU memory
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.side_memory_left = False  # a finished run left a cuBLAS workspace on its side stream
        self.stats = {"compiles": 0, "compile_s": [], "failures": 0}

    @property
    def busy(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def function_for(self, key, version: int, fallback: Callable) -> Callable:
        """The compiled function when this signature was compiled (at this structure version), else `fallback`."""
        return self.compiled if self.ready.get(key) == version else fallback

    def wanted(self, key, version: int) -> bool:
        return self.ready.get(key) != version and key not in self.failed

    def submit(self, key, version: int, structure, leaves: list) -> bool:
        """Start compiling `key` on copies of a call's arguments (as the GraphRunner flattened them: their
        structure and tensor leaves), unless a compile is already running."""
        with self._lock:
            if self.busy or not self.wanted(key, version):
                return False
            # same strides as the caller's tensors: dynamo guards on them (a contiguous copy of a strided
            # input would compile a variant the caller's call then recompiles on its own thread)
            copies = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
                      for t in leaves]
            device = next((t.device for t in copies if t.is_cuda), None)
            caller_stream = torch.cuda.current_stream(device) if device is not None else None
            args, kwargs = _unflatten(structure, iter(copies))
            self._thread = threading.Thread(target=self._run, args=(key, version, args, kwargs, device, caller_stream),
                                            name=f"compile-{self.name}", daemon=True)
            self._thread.start()
            return True

    def wait(self, timeout: float | None = None) -> bool:
        """Let a running compile finish (before weights move). True when none is running any more."""
        thread = self._thread
        if thread is not None:
            thread.join(None if timeout is None or timeout >= threading.TIMEOUT_MAX else timeout)
        return not self.busy

    def _run(self, key, version: int, args: tuple, kwargs: dict, device, caller_stream) -> None:
        started = time.perf_counter()
        try:
            with _short_switch_interval, torch.inference_mode():
                if device is not None:
                    with torch.cuda.device(device):
                        stream = torch.cuda.Stream()
                        stream.wait_stream(caller_stream)  # the copies were made on the caller's stream
                        with torch.cuda.stream(stream):
                            self.compiled(*args, **kwargs)
                        stream.synchronize()
                        # this run's freed activation blocks stay cached for its stream, which nothing uses
                        # again: give cached blocks back (graph pools are not touched by empty_cache). Its
                        # cuBLAS workspace goes at the next call's start (side_memory_left): clearing the
                        # workspaces here would race the serving thread's matmuls.
                        torch.cuda.empty_cache()
                        self.side_memory_left = True
                else:
                    self.compiled(*args, **kwargs)
        except Exception as exc:  # the signature stays on the plain forward
            self.stats["failures"] += 1
            if isinstance(exc, torch.OutOfMemoryError):
                self._oom[key] = self._oom.get(key, 0) + 1
                if self._oom[key] < OOM_ATTEMPTS:  # memory may be free the next time this call comes
                    log.warning("%s: background compile ran out of GPU memory; will try once more", self.name)
                    return
            self.failed.add(key)
            log.warning("%s: background compile failed, staying eager: %s: %s", self.name, type(exc).__name__, exc)
            return
        seconds = time.perf_counter() - started
        self.stats["compiles"] += 1
        self.stats["compile_s"].append(round(seconds, 2))
        self.ready[key] = version
        log.info("%s: compiled in the background in %.1f s", self.name, seconds)
