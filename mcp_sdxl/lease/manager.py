"""GpuLease: take the GPU from the LLM server, give it back, and say who has it.

Order of a hand-over (shared/notes/gpu.md, "A sane hand-over"):
  acquire: OS lock -> record -> LLM releases -> NVML shows enough free memory -> return
  release: (caller freed its VRAM) -> memory is back -> LLM wakes (+ warm-up) -> record cleared -> unlock
The record is written *before* the LLM is touched and says whether we slept it, so a holder that
dies anywhere in between leaves enough on disk for the next process to wake the LLM (recover()).
Every failure inside acquire ends with the LLM woken (or the record kept for recover()) and the lock
released: nothing is left half-done.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta
from typing import Literal

from pydantic import BaseModel

from mcp_sdxl.config.lease import LeaseConfig
from mcp_sdxl.errors import GpuLeaseError
from mcp_sdxl.lease.backends import LlmBackend, make_backend
from mcp_sdxl.lease.http import BackendError
from mcp_sdxl.lease.record import LeaseFiles, LeaseRecord, pid_alive, utcnow
from mcp_sdxl.lease.vram import NvmlReader, VramInfo, VramReader, describe, wait_for_free

log = logging.getLogger("mcp_sdxl.lease")


class LeaseStatus(BaseModel):
    state: Literal["free", "held_by_us", "held_by_other"]
    holder: LeaseRecord | None = None  # who holds it (state != free)
    holder_alive: bool | None = None
    expired: bool = False  # holder overran lease_ttl_s (advisory: the OS lock is still theirs)
    leftover: LeaseRecord | None = None  # lock free but a record says the LLM is still released
    runtime_dir: str
    vram: VramInfo | None = None
    vram_note: str | None = None  # why VRAM is None (then VRAM waits are skipped)
    llm_backend: str
    llm_url: str
    llm_state: dict | None = None
    llm_error: str | None = None  # the LLM being down is reported here, never raised
    lease_error: str | None = None  # lease files unreadable (e.g. runtime_dir not writable)
    idle_release_s: float


class GpuLease:
    """One per process. Thread-safe; acquire() while held only renews."""

    def __init__(
        self,
        config: LeaseConfig,
        *,
        backend: LlmBackend | None = None,
        vram_reader: VramReader | None = None,
        poll_s: float = 0.25,
    ) -> None:
        self.config = config
        self.files = LeaseFiles(config.resolved_runtime_dir())
        self.backend = backend or make_backend(config.llm)
        # Injectable so tests can script readings; the real one is NVML.
        self.vram_reader: VramReader = vram_reader or NvmlReader(config.gpu_index)
        self.poll_s = poll_s
        self._mutex = threading.RLock()  # re-entrant: a signal handler may release mid-acquire

    @property
    def held(self) -> bool:
        return self.files.held

    # ---- acquire -------------------------------------------------------------------------------
    def acquire(self, purpose: str, need_gb: float | None = None, *, timeout_s: float | None = None) -> LeaseRecord:
        """Block until the GPU is ours with `need_gb` GiB free (default vram_need_gb); raise
        GpuLeaseError naming the holder, the backend or the memory shortfall otherwise."""
        need = self.config.vram_need_gb if need_gb is None else need_gb
        timeout = self.config.acquire_timeout_s if timeout_s is None else timeout_s
        with self._mutex:
            if self.files.held:
                return self.renew(purpose)
            try:
                got = self.files.lock(timeout, poll_s=min(self.poll_s, 0.1))
            except OSError as exc:
                raise GpuLeaseError(
                    f"Cannot use the lease folder {self.files.dir}: {exc}. Set runtime_dir in configs/lease.yaml."
                ) from exc
            if not got:
                holder = self.files.read()
                who = holder.describe() if holder else f"a process that has not written {self.files.record_path} yet"
                raise GpuLeaseError(
                    f"GPU is busy: held by {who}; waited {timeout:g} s. "
                    "Try again later, or raise acquire_timeout_s in configs/lease.yaml."
                )
            try:
                return self._hand_over(purpose, need)
            except BaseException as exc:
                note = self._abort()
                if isinstance(exc, GpuLeaseError):
                    raise GpuLeaseError(f"{exc} {note}") from exc
                if isinstance(exc, OSError):
                    raise GpuLeaseError(f"Cannot write the lease record in {self.files.dir}: {exc}. {note}") from exc
                raise

    def _hand_over(self, purpose: str, need: float) -> LeaseRecord:
        # A record left with llm_released (dead holder, or release(wake_llm=False)) is inherited:
        # the LLM is asleep because of the lease, so our release must wake it.
        left = self.files.read()
        inherited = left if left is not None and left.llm_released else None
        now = utcnow()
        rec = LeaseRecord(
            owner=self.config.owner,
            pid=os.getpid(),
            purpose=purpose,
            acquired_at=now,
            expires_at=now + timedelta(seconds=self.config.lease_ttl_s),
            backend=self.backend.name,
            backend_url=self.backend.url,
            llm_released=inherited is not None,
            llm_detail=inherited.llm_detail if inherited else {},
        )
        self.files.write(rec)
        name, url = self.backend.name, self.backend.url
        try:
            detail = self.backend.prepare()
            if detail is not None:
                # Intent first: if we die during the sleep call, recover() still wakes it.
                rec.llm_released = True
                rec.llm_detail = self.backend.merge(rec.llm_detail, detail)
                self.files.write(rec)
                self.backend.release(detail)
        except BackendError as exc:
            raise GpuLeaseError(f"Could not make LLM backend {name} at {url} release the GPU: {exc}.") from exc

        started = time.monotonic()
        ok, info = wait_for_free(self.vram_reader, need, self.config.vram_wait_timeout_s, self.poll_s)
        if ok is False:
            raise GpuLeaseError(
                f"GPU memory did not free up within {time.monotonic() - started:.0f} s: need {need:.1f} GiB, "
                f"{describe(info)} (LLM backend {name}"
                f"{' was asked to release' if rec.llm_released else ' held nothing of ours'}). "
                "Free the GPU, or lower vram_need_gb / raise vram_wait_timeout_s in configs/lease.yaml."
            )
        if ok is None:
            log.info("VRAM not readable (%s): skipping the VRAM wait", self._vram_note())
        rec.vram_free_after_llm_gb = info.free_gb if info else None
        self.files.write(rec)
        log.info("GPU lease acquired for %r (LLM %s released: %s)", purpose, name, rec.llm_released)
        return rec

    def _abort(self) -> str:
        """Undo a failed acquire; returns a sentence saying where things stand."""
        error = self._wake_and_unlock(self.files.read(), wake=True)
        if error:
            return (
                f"Waking the LLM failed too ({error}); the record in {self.files.record_path} is kept so "
                "recover() retries. The lease is released."
            )
        return "The LLM was left awake (or woken again) and the lease released."

    def renew(self, purpose: str | None = None) -> LeaseRecord:
        """Push expires_at lease_ttl_s ahead (call while using the GPU); purpose may change."""
        with self._mutex:
            rec = self.files.read() if self.files.held else None
            if rec is None:
                raise GpuLeaseError("renew(): this process does not hold the GPU lease; call acquire() first.")
            rec.expires_at = utcnow() + timedelta(seconds=self.config.lease_ttl_s)
            if purpose:
                rec.purpose = purpose
            self.files.write(rec)
            return rec

    # ---- release -------------------------------------------------------------------------------
    def release(self, wake_llm: bool = True, *, vram_wait_s: float | None = None) -> dict:
        """Give the GPU back. Call after the engine freed its VRAM. Harmless when not held.

        Waits (bounded) until free VRAM is back to what the LLM left us, wakes what we slept,
        clears the record, unlocks. wake_llm=False keeps the LLM asleep; the record stays so the
        next acquire inherits it and recover() would wake it. Raises GpuLeaseError only when
        waking failed (the lock is released anyway; the record stays for recover())."""
        with self._mutex:
            if not self.files.held:
                return {"released": False, "reason": "not held by this process"}
            rec = self.files.read()
            waited = None
            if wake_llm and rec is not None and rec.llm_released and rec.vram_free_after_llm_gb is not None:
                target = max(0.0, rec.vram_free_after_llm_gb - self.config.vram_release_slack_gb)
                timeout = self.config.vram_wait_timeout_s if vram_wait_s is None else vram_wait_s
                ok, info = wait_for_free(self.vram_reader, target, timeout, self.poll_s)
                waited = ok
                if ok is False:
                    # Never leave the LLM asleep because we are slow to free memory: wake it anyway.
                    log.warning(
                        "VRAM not back after %g s (want %.1f GiB, %s); waking LLM anyway",
                        timeout,
                        target,
                        describe(info),
                    )
            error = self._wake_and_unlock(rec, wake=wake_llm)
            if error:
                raise GpuLeaseError(
                    f"GPU lease released, but waking LLM backend {self.backend.name} failed: {error}. "
                    f"The record in {self.files.record_path} is kept; recover() will retry."
                )
            woke = bool(wake_llm and rec is not None and rec.llm_released)
            return {"released": True, "llm_woken": woke, "vram_back": waited}

    def _wake_and_unlock(self, rec: LeaseRecord | None, *, wake: bool) -> str | None:
        """Wake what the record says we slept, then clear the record (unless the LLM is still
        asleep) and unlock. Never raises for backend trouble: returns its message instead."""
        error = None
        if rec is not None and rec.llm_released and rec.backend != self.backend.name:
            log.warning(
                "record says backend %s slept the LLM but configs/lease.yaml now says %s",
                rec.backend,
                self.backend.name,
            )
        try:
            if rec is not None and rec.llm_released:
                if wake:
                    try:
                        self.backend.wake(rec.llm_detail)
                    except BackendError as exc:
                        error = str(exc)
                    else:
                        self._warmup(rec.llm_detail)
                if wake and error is None:
                    self.files.clear()
            else:
                self.files.clear()
        finally:
            self.files.unlock()
        return error

    def _warmup(self, detail: dict) -> None:
        if not self.config.llm.warmup:
            return
        try:
            self.backend.warmup(detail)
        except BackendError as exc:  # a cold first request is not worth failing the release
            log.warning("LLM warm-up failed: %s", exc)

    # ---- recovery ------------------------------------------------------------------------------
    def recover(self) -> dict:
        """Call at start-up: if nobody holds the lease but a record says the LLM was slept by a
        holder that is gone, wake the LLM and clear the record. Never raises for backend trouble."""
        with self._mutex:
            if self.files.held:
                return {"action": "none", "reason": "held by this process"}
            if not self.files.try_lock():
                rec = self.files.read()
                return {"action": "none", "reason": f"held by {rec.describe() if rec else 'another process'}"}
            rec = self.files.read()
            if rec is None:
                self.files.unlock()
                return {"action": "none", "reason": "no record"}
            slept = rec.llm_released
            error = self._wake_and_unlock(rec, wake=True)
            if error:
                log.warning("recover(): waking the LLM failed: %s", error)
                return {"action": "wake_failed", "error": error, "record": rec.model_dump(mode="json")}
            log.info("recover(): cleared record of %s (LLM woken: %s)", rec.describe(), slept)
            return {"action": "woke_llm" if slept else "cleared", "record": rec.model_dump(mode="json")}

    # ---- status --------------------------------------------------------------------------------
    def _vram_note(self) -> str | None:
        return getattr(self.vram_reader, "unavailable_reason", None)

    def status(self) -> LeaseStatus:
        """Snapshot for humans and tools. Never raises: problems become strings."""
        # No self._mutex here: status must answer while another thread of ours waits in acquire().
        try:
            state = "held_by_us" if self.files.held else "held_by_other" if self.files.locked_by_other() else "free"
            rec = self.files.read()
        except OSError as exc:  # e.g. runtime_dir not writable
            state, rec = "free", None
            lock_error = f"lease files unreadable: {exc}"
        else:
            lock_error = None
        st = LeaseStatus(
            state=state,
            runtime_dir=str(self.files.dir),
            llm_backend=self.backend.name,
            llm_url=self.backend.url,
            idle_release_s=self.config.idle_release_s,
        )
        if rec is not None and state != "free":
            st.holder = rec
            st.holder_alive = pid_alive(rec.pid) if rec.host == socket.gethostname() else None
            st.expired = rec.expires_at is not None and rec.expires_at < utcnow()
        elif rec is not None and rec.llm_released:
            st.leftover = rec
        try:
            st.vram = self.vram_reader()
        except Exception as exc:  # noqa: BLE001 - status must answer
            st.vram_note = f"VRAM read failed: {exc}"
        if st.vram is None and st.vram_note is None:
            st.vram_note = (self._vram_note() or "VRAM unknown") + "; VRAM waits are skipped"
        try:
            st.llm_state = self.backend.state(self.config.llm.status_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the LLM being down is a status, not an error
            st.llm_error = str(exc)
        st.lease_error = lock_error
        return st
