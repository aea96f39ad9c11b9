"""The lease on disk: an OS lock file and a JSON record beside it.

The lock (fcntl.flock) says whether someone holds the GPU; the kernel drops it when the holding
process dies, however it dies. The record says who holds it and, more importantly, whether the LLM
was put to sleep by the lease: the record outlives a crashed holder so that the next process knows
it must wake the LLM (recover()).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

LOCK_NAME = "gpu-lease.lock"
RECORD_NAME = "gpu-lease.json"


def utcnow() -> datetime:
    return datetime.now(UTC)


class LeaseRecord(BaseModel):
    owner: str
    pid: int
    host: str = Field(default_factory=socket.gethostname)
    purpose: str = ""
    acquired_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None
    llm_released: bool = False  # True once the lease asked the LLM to free the GPU: it must be woken
    backend: str = "none"
    backend_url: str = ""
    llm_detail: dict = Field(default_factory=dict)  # what was released (e.g. Ollama model names)
    vram_free_after_llm_gb: float | None = None  # free VRAM once the LLM slept: release waits for it

    def describe(self) -> str:
        """One line naming the holder, for error messages."""
        since = self.acquired_at.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
        text = f"owner {self.owner!r} (pid {self.pid} on {self.host}) for {self.purpose!r} since {since}"
        if self.expires_at is not None and self.expires_at < utcnow():
            text += f"; its lease expired at {self.expires_at.astimezone():%H:%M:%S} (holder may be hung)"
        return text


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class LeaseFiles:
    """Lock file + record in one runtime folder. Not thread-safe: GpuLease serialises calls."""

    def __init__(self, runtime_dir: Path) -> None:
        self.dir = Path(runtime_dir)
        self.lock_path = self.dir / LOCK_NAME
        self.record_path = self.dir / RECORD_NAME
        self._fd: int | None = None  # open while we hold the lock

    def _ensure_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _open_lock(self) -> int:
        self._ensure_dir()
        # O_CLOEXEC (Python's default) keeps child processes from inheriting, and so holding, the lock.
        return os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_lock(self) -> bool:
        if self._fd is not None:
            return True
        fd = self._open_lock()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._fd = fd
        return True

    def lock(self, timeout_s: float, poll_s: float = 0.1) -> bool:
        """Take the lock, polling until `timeout_s`; False if someone still holds it then."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.try_lock():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

    def unlock(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def locked_by_other(self) -> bool:
        """Probe on a separate open file, without keeping the lock and without touching our own
        state, so status() can run while another thread of ours waits in acquire()."""
        if self._fd is not None:
            return False
        fd = self._open_lock()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return True
            raise
        finally:
            os.close(fd)  # closing drops the probe's flock, if it got one
        return False

    def read(self) -> LeaseRecord | None:
        """The record, or None when absent. A damaged record also reads as None (written atomically,
        so that only happens if someone edited it)."""
        try:
            return LeaseRecord.model_validate_json(self.record_path.read_bytes())
        except FileNotFoundError:
            return None
        except (ValidationError, ValueError, OSError):
            return None

    def write(self, record: LeaseRecord) -> None:
        """Atomic: write a temporary file in the same folder, fsync, rename over the record."""
        self._ensure_dir()
        data = json.dumps(record.model_dump(mode="json"), indent=2).encode()
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".gpu-lease.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.record_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def clear(self) -> None:
        self.record_path.unlink(missing_ok=True)
