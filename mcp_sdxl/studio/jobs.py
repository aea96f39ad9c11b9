"""A FIFO job queue with one worker thread: the engine runs one job at a time, in arrival order.

Every generation call is a job. A tool call waits for its job and forwards its progress; a call
that would take longer than a client waits returns the job id instead (poll get_job). A job keeps
running when its caller disconnects; cancel() stops it at the next denoising step.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mcp_sdxl.errors import BusyError, CancelledError, NotFoundError, UserInputError

log = logging.getLogger(__name__)


@dataclass
class Progress:
    done: int
    total: int
    message: str


@dataclass
class Job:
    id: str
    kind: str
    total_steps: int
    run: Callable[["Job"], Any]
    state: str = "queued"  # queued | running | done | failed | cancelled
    result: Any = None
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    events: list[Progress] = field(default_factory=list)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    partial: list[Any] = field(default_factory=list)  # finished pieces (e.g. images of a batch)

    def report(self, done: int, message: str) -> None:
        """Called by the worker; progress only ever increases."""
        if not self.events or done > self.events[-1].done:
            self.events.append(Progress(done, self.total_steps, message))

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def progress(self) -> Progress | None:
        return self.events[-1] if self.events else None

    def summary(self) -> dict:
        p = self.progress
        return {
            "job_id": self.id,
            "kind": self.kind,
            "state": self.state,
            "progress": {"done": p.done, "total": p.total, "message": p.message} if p else None,
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class JobQueue:
    def __init__(self, limit: int, ttl_s: float, on_idle: Callable[[], None] | None = None):
        self.limit = limit
        self.ttl_s = ttl_s
        self.on_idle = on_idle  # called by the worker when the queue runs empty
        self._jobs: dict[str, Job] = {}
        self._queue: "queue.Queue[Job | None]" = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running: Job | None = None
        self._worker = threading.Thread(target=self._work, name="mcp-sdxl-engine", daemon=True)
        self._worker.start()

    def submit(self, kind: str, total_steps: int, run: Callable[[Job], Any]) -> Job:
        with self._lock:
            self._expire()
            ahead = self._waiting + (1 if self._running else 0)
            if self._waiting >= self.limit:
                raise BusyError(
                    f"busy: {ahead} calls ahead of this one (queue limit {self.limit}); retry in a little while"
                )
            job = Job(id=f"job_{secrets.token_hex(6)}", kind=kind, total_steps=max(1, total_steps), run=run)
            self._jobs[job.id] = job
            self._waiting += 1
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise NotFoundError(
                f"no job {job_id!r}: job ids are kept for {self.ttl_s / 3600:g} h after they finish; "
                "images from finished jobs stay in the store (see list_images)"
            )
        return job

    def ahead_of(self, job: Job) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.state in ("queued", "running") and j.created_at < job.created_at)

    def stop(self) -> None:
        for job in list(self._jobs.values()):
            if job.state in ("queued", "running"):
                job.cancel()
        self._queue.put(None)
        self._worker.join(timeout=30)

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                self._running = job
            self._run_one(job)
            with self._lock:
                self._running = None
            if self._queue.empty() and self.on_idle is not None:
                try:
                    self.on_idle()
                except Exception:
                    log.exception("idle hook failed")

    def _run_one(self, job: Job) -> None:
        if job.cancel_event.is_set():
            job.state, job.error = "cancelled", "cancelled before it started"
        else:
            job.state, job.started_at = "running", time.time()
            try:
                job.result = job.run(job)
                job.state = "done"
            except CancelledError as exc:
                job.state, job.error = "cancelled", str(exc)
            except (UserInputError, BusyError) as exc:
                job.state, job.error = "failed", str(exc)
            except Exception as exc:  # reported to the caller; the worker keeps serving
                log.exception("job %s failed", job.id)
                job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
        job.finished_at = time.time()
        job.finished.set()

    def _expire(self) -> None:
        now = time.time()
        for job_id, job in list(self._jobs.items()):
            if job.finished_at and now - job.finished_at > self.ttl_s:
                del self._jobs[job_id]
