"""A FIFO job queue with one worker thread: the engine runs one job at a time, in arrival order.

Every generation call is a job. A tool call waits for its job and forwards its progress; a call
that would take longer than a client waits returns the job id instead (poll get_job). A job started
with run_as_job keeps running whatever happens to its caller. A call that waits for its job is
cancelled when the client cancels it, which under the 2026-07-28 protocol includes closing the
response stream (the SDK's reading of a dropped connection); cancel() stops a job at the next step.
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mcp_sdxl.errors import BusyError, CancelledError, ConfigError, GpuLeaseError, NotFoundError, UserInputError

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
    waiting_for: str | None = None  # what a running job waits for before its first step (the GPU lease)
    seq: int = 0  # arrival order
    _start_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def report(self, done: int, message: str) -> None:
        """Called by the worker; progress only ever increases and never passes total_steps."""
        done = min(done, self.total_steps)
        if not self.events or done > self.events[-1].done:
            self.events.append(Progress(done, self.total_steps, message))

    def cancel(self) -> None:
        """A running job stops at its next denoising step; a queued one is cancelled at once (the worker
        skips it when its turn comes), so whoever cancels it sees the final state without waiting."""
        with self._start_lock:
            self.cancel_event.set()
            if self.state == "queued":
                self.state, self.error, self.finished_at = "cancelled", "cancelled before it started", time.time()
                self.finished.set()

    def start(self) -> bool:
        """Called by the worker: queued -> running, unless it was cancelled first."""
        with self._start_lock:
            if self.cancel_event.is_set() or self.state != "queued":
                return False
            self.state, self.started_at = "running", time.time()
            return True

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
        self._seq = itertools.count(1)
        self._running: Job | None = None
        self._worker = threading.Thread(target=self._work, name="mcp-sdxl-engine", daemon=True)
        self._worker.start()

    def submit(self, kind: str, total_steps: int, run: Callable[[Job], Any]) -> Job:
        with self._lock:
            self._expire()
            waiting = self._waiting_jobs()
            if len(waiting) >= self.limit:
                ahead = len(waiting) + (1 if self._running else 0)
                raise BusyError(
                    f"busy: {ahead} calls ahead of this one (queue limit {self.limit}); retry in a little while"
                )
            job = Job(id=f"job_{secrets.token_hex(6)}", kind=kind, total_steps=max(1, total_steps), run=run,
                      seq=next(self._seq))
            self._jobs[job.id] = job
            self._queue.put(job)  # under the lock: queue order is submission order
        return job

    def _waiting_jobs(self) -> list[Job]:
        """Queued jobs that will still run (a cancelled one is skipped when its turn comes)."""
        return [j for j in self._jobs.values() if j.state == "queued" and not j.cancel_event.is_set()]

    def get(self, job_id: str) -> Job:
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise NotFoundError(
                f"no job {str(job_id)[:80]!r}: unknown or expired. Job ids are kept for {_duration(self.ttl_s)} after "
                "they finish, by the server process that ran them (a restart forgets them); images from finished "
                "jobs stay in the store (see list_images)"
            )
        return job

    def ahead_of(self, job: Job) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values()
                       if j.seq < job.seq and (j.state == "running" or (j.state == "queued" and not j.cancel_event.is_set())))

    def snapshot(self) -> dict[str, Any]:
        """For status tools: limit, how many wait, what runs now."""
        with self._lock:
            running = self._running
            return {
                "limit": self.limit,
                "waiting": len(self._waiting_jobs()),
                "running": running.summary() if running is not None else None,
            }

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
                self._running = job
            try:
                self._run_one(job)
            finally:
                with self._lock:
                    self._running = None

    def _run_one(self, job: Job) -> None:
        state, result, error = "cancelled", None, "cancelled before it started"
        started = job.start()
        try:
            if started:
                try:
                    state, result, error = "done", job.run(job), None
                except CancelledError as exc:
                    state, error = "cancelled", str(exc)
                except (UserInputError, BusyError, ConfigError, GpuLeaseError) as exc:  # written for the caller
                    state, error = "failed", str(exc)
                except BaseException as exc:  # reported to the caller; the worker keeps serving whatever happened
                    log.exception("job %s failed", job.id)
                    state, error = "failed", f"{type(exc).__name__}: {exc}"
            # Nothing else waiting: the idle hook runs *before* the caller learns the outcome, so a GPU
            # handed back after each job (idle_release_s: 0) is back, and the LLM awake, when the
            # result arrives and the agent's next LLM request goes out.
            if self._queue.empty() and self.on_idle is not None:
                try:
                    self.on_idle()
                except Exception:
                    log.exception("idle hook failed")
        finally:
            if started or not job.finished.is_set():  # a job cancelled while queued was made final by cancel()
                job.result, job.error = result, error
                job.state = state
                job.finished_at = time.time()
                job.finished.set()

    def _expire(self) -> None:
        now = time.time()
        for job_id, job in list(self._jobs.items()):
            if job.finished_at and now - job.finished_at > self.ttl_s:
                del self._jobs[job_id]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:g} s"
    if seconds < 7200:
        return f"{seconds / 60:g} min"
    return f"{seconds / 3600:g} h"
