"""Real processes contending for the lease, dying while holding it, and being asked to stop."""

import json
import os
import signal
import threading
import time

import pytest
from lease_fakes import read_line, spawn

from mcp_sdxl.errors import GpuLeaseError
from mcp_sdxl.lease import GpuLease
from mcp_sdxl.lease.record import LeaseFiles


def test_second_process_waits_then_errors_naming_the_holder(make_config, holder):
    cfg = make_config(owner="sdxl-holder", lease_ttl_s=0.5)
    proc = holder(cfg, "hold")
    assert read_line(proc) == "HELD"

    lease = GpuLease(cfg.model_copy(update={"owner": "second"}))
    t0 = time.monotonic()
    with pytest.raises(GpuLeaseError) as err:
        lease.acquire("mine", timeout_s=1.0)
    waited = time.monotonic() - t0
    msg = str(err.value)
    assert waited >= 1.0
    assert "'sdxl-holder'" in msg and f"pid {proc.pid}" in msg and "'holder test'" in msg and "since" in msg
    assert "expired" in msg  # the holder overran lease_ttl_s: the waiter is told it may be hung
    assert not lease.held

    st = lease.status()
    assert st.state == "held_by_other" and st.holder.pid == proc.pid and st.holder_alive is True and st.expired


def test_status_answers_while_a_thread_waits_in_acquire(make_config, holder):
    cfg = make_config()
    proc = holder(cfg, "hold")
    assert read_line(proc) == "HELD"
    lease = GpuLease(cfg)
    errors = []

    def waiter():
        try:
            lease.acquire("queued", timeout_s=1.5)
        except GpuLeaseError as exc:
            errors.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert lease.status().state == "held_by_other"
    assert time.monotonic() - t0 < 1
    thread.join()
    assert errors and not lease.held  # the probe did not hand the waiter a lock it does not hold


def test_second_process_gets_the_gpu_when_the_holder_releases(make_config, holder):
    cfg = make_config()
    proc = holder(cfg, "hold", "1.0")
    assert read_line(proc) == "HELD"
    lease = GpuLease(cfg)
    t0 = time.monotonic()
    rec = lease.acquire("mine", timeout_s=15)
    assert time.monotonic() - t0 > 0.3  # it really waited
    assert rec.pid == os.getpid()
    assert read_line(proc) == "RELEASED"
    lease.release()


def test_sigkilled_holder_is_recovered_and_llm_woken(make_config, holder, vllm):
    cfg = make_config("vllm", vllm.url)
    proc = holder(cfg, "hold")
    assert read_line(proc) == "HELD"
    assert vllm.sleeping
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)

    # The kernel dropped the lock; the record still says the LLM sleeps because of the lease.
    files = LeaseFiles(cfg.resolved_runtime_dir())
    assert not files.locked_by_other() and files.read().llm_released

    rec = spawn(cfg, "recover")  # a new process starting up
    result = json.loads(read_line(rec))
    rec.wait(10)
    assert result["action"] == "woke_llm" and result["record"]["pid"] == proc.pid
    assert "POST /wake_up" in vllm.trace() and not vllm.sleeping
    assert files.read() is None


def test_acquire_after_sigkilled_holder_inherits_and_wakes_on_release(make_config, holder, vllm):
    cfg = make_config("vllm", vllm.url)
    proc = holder(cfg, "hold")
    assert read_line(proc) == "HELD"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)

    lease = GpuLease(cfg)
    rec = lease.acquire("after crash", timeout_s=5)
    assert rec.llm_released  # vLLM says it is asleep, but the lease slept it: ours to wake
    assert vllm.trace().count("POST /sleep?level=1") == 1  # not slept twice
    lease.release()
    assert vllm.trace()[-3:] == ["POST /wake_up", "GET /v1/models", "POST /v1/completions"]
    assert not vllm.sleeping


def test_sigterm_hook_releases_and_wakes(make_config, holder, vllm):
    cfg = make_config("vllm", vllm.url)
    proc = holder(cfg, "hooks")
    assert read_line(proc) == "HELD"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == -signal.SIGTERM  # still dies of the signal after the hook ran
    assert not vllm.sleeping and "POST /wake_up" in vllm.trace()
    files = LeaseFiles(cfg.resolved_runtime_dir())
    assert not files.locked_by_other() and files.read() is None


def test_atexit_hook_frees_engine_then_releases(make_config, holder, vllm):
    cfg = make_config("vllm", vllm.url)
    proc = holder(cfg, "exit")
    assert read_line(proc) == "HELD"
    assert read_line(proc) == "ENGINE FREED"  # on_shutdown ran first
    assert proc.wait(10) == 0
    assert not vllm.sleeping
    assert LeaseFiles(cfg.resolved_runtime_dir()).read() is None
