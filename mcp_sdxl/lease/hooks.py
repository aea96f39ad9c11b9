"""Shutdown hooks: give the GPU back and wake the LLM when the process is told to stop.

SIGKILL and power loss cannot be caught; for those the record on disk lets the next start's
recover() wake the LLM. These hooks cover the polite endings: SIGTERM (systemd, docker stop),
SIGHUP (terminal closed) and normal interpreter exit (atexit).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from collections.abc import Callable

from mcp_sdxl.lease.manager import GpuLease

log = logging.getLogger("mcp_sdxl.lease")


def install_signal_handlers(
    lease: GpuLease,
    *,
    on_shutdown: Callable[[], None] | None = None,
    signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP),
    use_atexit: bool = True,
) -> Callable[[], None]:
    """Install handlers that run `on_shutdown()` (the application frees the engine's VRAM there,
    so the LLM finds its memory back) and then `lease.release(wake_llm=True)`, once.

    After that, the previous handler runs; if it was the default, the signal is re-sent so the
    process still dies of it. Must be called from the main thread (a rule of `signal.signal`).
    Returns a function that restores the previous handlers and unregisters the atexit hook.
    """
    done = threading.Event()

    def shutdown() -> None:
        if done.is_set():
            return
        done.set()
        if on_shutdown is not None:
            try:
                on_shutdown()
            except Exception:
                log.exception("on_shutdown failed; releasing the GPU lease anyway")
        try:
            lease.release(wake_llm=True)
        except Exception:
            log.exception("releasing the GPU lease at shutdown failed")

    previous: dict[int, object] = {}

    def handler(signum: int, frame: object) -> None:
        shutdown()
        prev = previous.get(signum, signal.SIG_DFL)
        if callable(prev):
            prev(signum, frame)
        elif prev != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for sig in signals:
        previous[sig] = signal.signal(sig, handler)
    if use_atexit:
        atexit.register(shutdown)

    def uninstall() -> None:
        for sig, prev in previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        if use_atexit:
            atexit.unregister(shutdown)

    return uninstall
