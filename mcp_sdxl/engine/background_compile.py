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


class BackgroundCompiler:
    def __init__(self, compiled: Callable, *, name: str):
        self.compiled = compiled  # torch.compile(forward): compiles on its first call for each signature
        self.name = name
        self.ready: dict[Any, int] = {}  # signature -> the weights' structure version it was compiled at
        self.failed: set = set()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
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
            copies = [t.detach().clone() for t in leaves]
            on_cuda = any(t.is_cuda for t in copies)
            args, kwargs = _unflatten(structure, iter(copies))
            self._thread = threading.Thread(target=self._run, args=(key, version, args, kwargs, on_cuda),
                                            name=f"compile-{self.name}", daemon=True)
            self._thread.start()
            return True

    def wait(self, timeout: float | None = None) -> bool:
        """Let a running compile finish (before weights move). True when none is running any more."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.busy

    def _run(self, key, version: int, args: tuple, kwargs: dict, on_cuda: bool) -> None:
        started = time.perf_counter()
        # The compile is Python that holds the GIL; the serving thread gives the GIL up in most torch calls and
        # waits up to one switch interval (5 ms) to get it back each time: a 30 ms UNet step took ~0.5 s while
        # the UNet compiled (H200). At 50 us the serving thread's CPU work per step stays under the GPU's time.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SERVING_SWITCH_INTERVAL_S)
        try:
            stream = torch.cuda.Stream() if on_cuda else None
            with torch.inference_mode():
                if stream is not None:
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        self.compiled(*args, **kwargs)
                    stream.synchronize()
                    # the caching allocator keeps this run's freed activation blocks for this stream only,
                    # which nothing uses again: give them back (graph pools are not touched by empty_cache)
                    torch.cuda.empty_cache()
                else:
                    self.compiled(*args, **kwargs)
        except Exception as exc:  # the signature stays on the plain forward
            self.failed.add(key)
            self.stats["failures"] += 1
            log.warning("%s: background compile failed, staying eager: %s: %s", self.name, type(exc).__name__, exc)
            return
        finally:
            sys.setswitchinterval(switch_interval)
        seconds = time.perf_counter() - started
        self.stats["compiles"] += 1
        self.stats["compile_s"].append(round(seconds, 2))
        self.ready[key] = version
        log.info("%s: compiled in the background in %.1f s", self.name, seconds)

