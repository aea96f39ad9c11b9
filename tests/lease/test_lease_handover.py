"""Hand-over order against fake LLM servers speaking the documented endpoints."""

import socket

import pytest
from lease_fakes import FakeLlamaSwap, FakeSglang

from mcp_sdxl.errors import GpuLeaseError
from mcp_sdxl.lease import GpuLease
from mcp_sdxl.lease.record import LeaseFiles


def lock_is_free(cfg) -> bool:
    return not LeaseFiles(cfg.resolved_runtime_dir()).locked_by_other()


def test_vllm_sleeps_before_acquire_returns_and_wakes_after_release(make_config, vllm):
    cfg = make_config("vllm", vllm.url)
    lease = GpuLease(cfg)
    rec = lease.acquire("portrait")
    vllm.events.append("ACQUIRED")
    assert rec.llm_released and rec.backend == "vllm" and rec.llm_detail == {"level": 1}
    assert vllm.sleeping
    on_disk = LeaseFiles(cfg.resolved_runtime_dir()).read()
    assert on_disk.llm_released and on_disk.purpose == "portrait"
    assert not lock_is_free(cfg)

    result = lease.release()
    assert result["llm_woken"] is True
    assert vllm.trace() == [
        "GET /is_sleeping",
        "POST /sleep?level=1",
        "ACQUIRED",
        "POST /wake_up",
        "GET /v1/models",  # warm-up: find the model, then one token
        "POST /v1/completions",
    ]
    assert vllm.calls[-1][2]["max_tokens"] == 1
    assert not vllm.sleeping
    assert LeaseFiles(cfg.resolved_runtime_dir()).read() is None
    assert lock_is_free(cfg)


def test_vllm_level2_reloads_weights(make_config, vllm):
    lease = GpuLease(make_config("vllm", vllm.url, llm={"vllm_sleep_level": 2, "warmup_model": "fake/llm"}))
    lease.acquire("x")
    lease.release()
    assert vllm.trace() == [
        "GET /is_sleeping",
        "POST /sleep?level=2",
        "POST /wake_up",
        "POST /collective_rpc",
        "POST /reset_prefix_cache",
        "POST /v1/completions",
    ]
    assert vllm.calls[3][2] == {"method": "reload_weights"}


def test_vllm_asleep_before_us_is_left_asleep(make_config, vllm):
    vllm.sleeping = True  # someone else slept it: we only wake what we slept
    lease = GpuLease(make_config("vllm", vllm.url))
    assert lease.acquire("x").llm_released is False
    lease.release()
    assert vllm.trace() == ["GET /is_sleeping"]
    assert vllm.sleeping


def test_release_twice_is_harmless(make_config, vllm):
    lease = GpuLease(make_config("vllm", vllm.url))
    lease.acquire("x")
    assert lease.release()["released"] is True
    assert lease.release() == {"released": False, "reason": "not held by this process"}
    assert vllm.trace().count("POST /wake_up") == 1


def test_acquire_while_held_only_renews(make_config, vllm):
    lease = GpuLease(make_config("vllm", vllm.url))
    first = lease.acquire("a")
    second = lease.acquire("b")
    assert second.purpose == "b" and second.expires_at >= first.expires_at
    assert vllm.trace().count("POST /sleep?level=1") == 1
    lease.release()


def test_ollama_unloads_every_model_and_polls_until_empty(make_config, ollama):
    lease = GpuLease(make_config("ollama", ollama.url))
    rec = lease.acquire("x")
    ollama.events.append("ACQUIRED")
    keys = ollama.trace()
    unloads = [c[2] for c in ollama.calls if isinstance(c, tuple) and c[1] == "/api/generate"]
    assert unloads == [{"model": "llama3.2:3b", "keep_alive": 0}, {"model": "qwen2.5:7b", "keep_alive": 0}]
    assert rec.llm_detail == {"models": ["llama3.2:3b", "qwen2.5:7b"]}
    last_unload = max(i for i, k in enumerate(keys) if k == "POST /api/generate")
    polls = keys[last_unload + 1 : keys.index("ACQUIRED")]
    assert len(polls) >= 2 and set(polls) == {"GET /api/ps"}  # async unload: polled until empty
    assert ollama._visible() == []

    lease.release()  # no reload configured: Ollama reloads lazily, we send nothing
    assert ollama.trace()[-1] == "ACQUIRED"


def test_ollama_reloads_what_it_unloaded(make_config, ollama):
    lease = GpuLease(make_config("ollama", ollama.url, llm={"ollama_reload_keep_alive": "10m"}))
    lease.acquire("x")
    ollama.events.append("ACQUIRED")
    lease.release()
    after = ollama.calls[ollama.calls.index("ACQUIRED") + 1 :]
    assert [(c[0], c[1], c[2]) for c in after] == [
        ("POST", "/api/generate", {"model": "llama3.2:3b", "keep_alive": "10m"}),
        ("POST", "/api/generate", {"model": "qwen2.5:7b", "keep_alive": "10m"}),
    ]
    assert ollama._visible() == ["llama3.2:3b", "qwen2.5:7b"]


def test_ollama_with_nothing_loaded_does_nothing(make_config):
    from lease_fakes import FakeOllama

    fake = FakeOllama([])
    try:
        lease = GpuLease(make_config("ollama", fake.url, llm={"ollama_reload_keep_alive": "5m"}))
        assert lease.acquire("x").llm_released is False
        lease.release()
        assert fake.trace() == ["GET /api/ps"]
    finally:
        fake.close()


def test_sglang_release_and_resume(make_config):
    fake = FakeSglang()
    try:
        lease = GpuLease(make_config("sglang", fake.url))
        lease.acquire("x")
        fake.events.append("ACQUIRED")
        lease.release()
        assert fake.trace() == [
            "POST /release_memory_occupation",
            "ACQUIRED",
            "POST /resume_memory_occupation",
            "GET /v1/models",
            "POST /v1/completions",
        ]
    finally:
        fake.close()


def test_llama_swap_unloads_and_warms_the_model_it_ran(make_config):
    fake = FakeLlamaSwap()
    try:
        lease = GpuLease(make_config("llama_swap", fake.url))
        lease.acquire("x")
        assert fake.running == []
        lease.release()
        assert fake.trace() == ["GET /running", "GET /unload", "GET /running", "POST /v1/completions"]
        assert fake.running == ["qwen"]
    finally:
        fake.close()


def test_shell_backend_runs_stop_then_start(make_config, tmp_path):
    log = tmp_path / "shell.log"
    lease = GpuLease(
        make_config("shell", llm={"shell_stop": f"echo stop >> {log}", "shell_start": f"echo start >> {log}"})
    )
    lease.acquire("x")
    assert log.read_text() == "stop\n"
    lease.release()
    assert log.read_text() == "stop\nstart\n"


def test_shell_stop_failing_is_a_clear_error(make_config):
    lease = GpuLease(make_config("shell", llm={"shell_stop": "echo no GPU for you >&2; exit 3", "shell_start": "true"}))
    with pytest.raises(GpuLeaseError, match="exited 3: no GPU for you"):
        lease.acquire("x")
    assert not lease.held


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_backend_is_a_clear_error_and_lock_is_released(make_config):
    url = f"http://127.0.0.1:{free_port()}"
    cfg = make_config("vllm", url)
    lease = GpuLease(cfg)
    with pytest.raises(GpuLeaseError) as err:
        lease.acquire("x")
    msg = str(err.value)
    assert "vllm" in msg and url in msg and "unreachable" in msg and "lease released" in msg
    assert not lease.held and lock_is_free(cfg)
    assert LeaseFiles(cfg.resolved_runtime_dir()).read() is None  # state known: nothing left behind
    status = lease.status()  # status never raises because the LLM is down
    assert status.state == "free" and "unreachable" in status.llm_error


def test_failed_sleep_wakes_llm_again(make_config, vllm):
    vllm.fail["POST /sleep"] = 500
    cfg = make_config("vllm", vllm.url)
    with pytest.raises(GpuLeaseError, match="HTTP 500"):
        GpuLease(cfg).acquire("x")
    # a half-done sleep is undone (then warmed up)
    assert vllm.trace()[1:] == ["POST /sleep?level=1", "POST /wake_up", "GET /v1/models", "POST /v1/completions"]
    assert lock_is_free(cfg) and LeaseFiles(cfg.resolved_runtime_dir()).read() is None


def test_missing_sleep_mode_hints_at_the_flag(make_config, vllm):
    vllm.fail["GET /is_sleeping"] = 404
    with pytest.raises(GpuLeaseError, match="--enable-sleep-mode"):
        GpuLease(make_config("vllm", vllm.url)).acquire("x")


def test_slow_backend_hits_http_timeout(make_config, vllm):
    vllm.delay["POST /sleep"] = 2
    cfg = make_config("vllm", vllm.url, llm={"timeout_s": 0.3})
    with pytest.raises(GpuLeaseError, match="unreachable.*/sleep"):
        GpuLease(cfg).acquire("x")
    assert lock_is_free(cfg)


def test_wake_failure_keeps_record_for_recover(make_config, vllm):
    cfg = make_config("vllm", vllm.url)
    lease = GpuLease(cfg)
    lease.acquire("x")
    vllm.fail["POST /wake_up"] = 503
    with pytest.raises(GpuLeaseError, match="waking LLM backend vllm failed"):
        lease.release()
    assert not lease.held and lock_is_free(cfg)
    status = lease.status()
    assert status.state == "free" and status.leftover is not None and status.leftover.llm_released
    assert lease.release()["released"] is False  # second release still harmless
    del vllm.fail["POST /wake_up"]
    assert lease.recover()["action"] == "woke_llm"
    assert not vllm.sleeping and LeaseFiles(cfg.resolved_runtime_dir()).read() is None


def test_status_reports_llm_state_and_missing_nvml(make_config, vllm):
    lease = GpuLease(make_config("vllm", vllm.url))
    st = lease.status()
    assert st.state == "free" and st.llm_state == {"is_sleeping": False} and st.llm_error is None
    if st.vram is None:  # CPU machine: no NVML
        assert "NVML unavailable" in st.vram_note and "VRAM waits are skipped" in st.vram_note
    lease.acquire("x")
    st = lease.status()
    assert st.state == "held_by_us" and st.holder.purpose == "x" and st.holder_alive
    assert st.llm_state == {"is_sleeping": True}
    lease.release()


def test_status_with_hung_llm_answers_within_status_timeout(make_config, vllm):
    import time

    vllm.delay["GET /is_sleeping"] = 3
    lease = GpuLease(make_config("vllm", vllm.url, llm={"status_timeout_s": 0.3}))
    t0 = time.monotonic()
    st = lease.status()
    assert time.monotonic() - t0 < 2 and "timed out" in st.llm_error


# ---- VRAM wait logic, driven by a scripted reader (NVML itself is absent here) ------------------


def test_acquire_waits_for_free_vram_after_llm_sleeps(make_config, vllm, scripted):
    reader = scripted([3, 6, 11, 13], log=vllm.events)
    lease = GpuLease(make_config("vllm", vllm.url, vram_need_gb=12), vram_reader=reader, poll_s=0.01)
    rec = lease.acquire("x")
    assert vllm.trace() == ["GET /is_sleeping", "POST /sleep?level=1", "VRAM 3", "VRAM 6", "VRAM 11", "VRAM 13"]
    assert rec.vram_free_after_llm_gb == 13


def test_release_waits_for_vram_back_then_wakes(make_config, vllm, scripted):
    reader = scripted([20], log=vllm.events)
    lease = GpuLease(
        make_config("vllm", vllm.url, vram_need_gb=12, vram_release_slack_gb=1), vram_reader=reader, poll_s=0.01
    )
    lease.acquire("x")
    reader.free = [9, 9, 18.5, 19.5]
    reader.reads = 0
    del vllm.events[:]
    lease.release()
    assert vllm.trace()[:5] == ["VRAM 9", "VRAM 9", "VRAM 18.5", "VRAM 19.5", "POST /wake_up"]  # target 20 - 1


def test_release_wakes_anyway_when_vram_never_comes_back(make_config, vllm, scripted):
    reader = scripted([20])
    lease = GpuLease(make_config("vllm", vllm.url, vram_need_gb=12), vram_reader=reader, poll_s=0.01)
    lease.acquire("x")
    reader.free = [5]
    assert lease.release(vram_wait_s=0.2) == {"released": True, "llm_woken": True, "vram_back": False}
    assert not vllm.sleeping


def test_vram_timeout_wakes_llm_and_releases_lock(make_config, vllm, scripted):
    cfg = make_config("vllm", vllm.url, vram_need_gb=12, vram_wait_timeout_s=0.3)
    lease = GpuLease(cfg, vram_reader=scripted([4.5]), poll_s=0.02)
    with pytest.raises(GpuLeaseError) as err:
        lease.acquire("x")
    msg = str(err.value)
    assert "need 12.0 GiB" in msg and "free 4.5 of 80.0 GiB" in msg and "woken again" in msg
    assert vllm.trace()[-3:] == ["POST /wake_up", "GET /v1/models", "POST /v1/completions"]
    assert not vllm.sleeping and lock_is_free(cfg) and LeaseFiles(cfg.resolved_runtime_dir()).read() is None


def test_vram_wait_skipped_cleanly_without_nvml(make_config, vllm):
    # The default reader is NVML; on this CPU machine it reads None, so even an impossible need passes.
    lease = GpuLease(make_config("vllm", vllm.url, vram_need_gb=10_000, vram_wait_timeout_s=0.1))
    if lease.vram_reader() is not None:
        pytest.skip("NVML is available here: the skip path does not apply")
    rec = lease.acquire("x")
    assert rec.vram_free_after_llm_gb is None
    assert lease.release() == {"released": True, "llm_woken": True, "vram_back": None}
