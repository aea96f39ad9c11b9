"""The GPU lease seen through the tools: a generation puts a (fake, HTTP) vLLM to sleep first,
release_gpu wakes it, the idle timer releases on its own, a dead LLM gives a clear error."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml
from mcp import Client

from mcp_sdxl.config import load_settings
from mcp_sdxl.server import build_server
from mcp_sdxl.studio import Studio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lease"))
from lease_fakes import FakeVllm  # noqa: E402

pytestmark = pytest.mark.anyio

SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def vllm():
    fake = FakeVllm()
    yield fake
    fake.close()


def _studio(config_dir, home, url, **lease):
    path = config_dir / "lease.yaml"
    data = yaml.safe_load(path.read_text())
    data.update(lease)
    data["llm"] = {**(data.get("llm") or {}), "backend": "vllm", "url": url, "timeout_s": 3, "warmup": True}
    data["acquire_timeout_s"] = 2
    path.write_text(yaml.safe_dump(data))
    return Studio(load_settings(config_dir, home=home, profile="tiny"))


async def test_generation_sleeps_llm_and_release_wakes_it(config_dir, home, vllm):
    studio = _studio(config_dir, home, vllm.url)
    try:
        async with Client(build_server(studio)) as client:
            result = await client.call_tool("generate_character", {"character": "luca", "scene_description": "x", **SMALL})
            assert not result.is_error, result.content[0].text
            assert vllm.sleeping and "POST /sleep?level=1" in vllm.trace()
            status = (await client.call_tool("gpu_status", {})).structured_content
            assert status["lease"]["state"] == "held_by_us" and status["lease"]["llm_state"]["is_sleeping"] is True
            released = (await client.call_tool("release_gpu", {"mode": "unload"})).structured_content
            assert released["lease"]["llm_woken"] is True and released["engine_state"] == "unloaded"
            assert not vllm.sleeping
            trace = vllm.trace()
            assert trace.index("POST /wake_up") > trace.index("POST /sleep?level=1")
            assert "POST /v1/completions" in trace  # 1-token warm-up after the wake
            again = (await client.call_tool("release_gpu", {})).structured_content
            assert again["lease"]["released"] is False  # idempotent
    finally:
        studio.close()


async def test_idle_timer_releases_the_gpu(config_dir, home, vllm):
    studio = _studio(config_dir, home, vllm.url, idle_release_s=0.5)
    try:
        async with Client(build_server(studio)) as client:
            await client.call_tool("generate_character", {"character": "alberto", "scene_description": "x", **SMALL})
        deadline = time.time() + 10
        while (vllm.sleeping or studio.lease.status().state != "free") and time.time() < deadline:
            time.sleep(0.1)
        assert not vllm.sleeping and studio.lease.status().state == "free"
    finally:
        studio.close()


async def test_llm_down_is_a_clear_error_and_nothing_is_held(config_dir, home):
    studio = _studio(config_dir, home, "http://127.0.0.1:9")  # nothing listens on port 9
    try:
        async with Client(build_server(studio)) as client:
            result = await client.call_tool("generate_character", {"character": "luca", "scene_description": "x", **SMALL})
            assert result.is_error
            assert "vllm" in result.content[0].text.lower() and "127.0.0.1:9" in result.content[0].text
            status = (await client.call_tool("gpu_status", {})).structured_content
        assert status["lease"]["state"] == "free" and status["lease"]["llm_error"]
        assert list((home / "outputs").glob("img_*")) == []
    finally:
        studio.close()


async def test_release_gpu_during_a_job_waits_for_the_queue_to_run_empty(config_dir, home, vllm):
    """Released under a running job, the engine offloaded between two images, the LLM woke, and the job's
    next image loaded the engine back without the lease. Now release_gpu says it is deferred, the LLM
    sleeps until the job ends, and the GPU goes back (LLM woken) as soon as the queue is empty."""
    import anyio

    studio = _studio(config_dir, home, vllm.url, idle_release_s=3600)  # no idle release: only ours
    try:
        async with Client(build_server(studio)) as client:
            started = await client.call_tool("generate_character", {
                "character": "luca", "scene_description": "x", "num_candidates": 3, "run_as_job": True,
                "width": 64, "height": 64, "steps": 8})
            job_id = started.structured_content["job_id"]
            for _ in range(400):  # until it generates
                if studio.jobs.get(job_id).state == "running" and vllm.sleeping:
                    break
                await anyio.sleep(0.02)
            released = (await client.call_tool("release_gpu", {})).structured_content
            assert released["deferred"] is True and released["running_job"] == job_id, released
            assert vllm.sleeping and studio.lease.held  # the job keeps the GPU
            job = studio.jobs.get(job_id)
            while not job.events or job.events[-1].done < job.total_steps:  # still denoising
                assert vllm.sleeping and studio.lease.held
                await anyio.sleep(0.02)
            with anyio.fail_after(30):
                while job.state == "running":
                    await anyio.sleep(0.02)
            assert studio.jobs.get(job_id).state == "done"
            for _ in range(200):
                if not studio.lease.held:
                    break
                await anyio.sleep(0.02)
            assert not studio.lease.held and not vllm.sleeping  # released and woken once the queue ran empty
    finally:
        studio.close()


async def test_a_job_waiting_for_a_lease_another_process_holds_says_so(config_dir, home, vllm):
    """The job showed "generating" with no progress for up to acquire_timeout_s while another program
    held the GPU lease; a model polling it had nothing to go on."""
    import anyio
    from lease_fakes import read_line, spawn

    studio = _studio(config_dir, home, vllm.url)  # acquire_timeout_s: 2
    holder = spawn(studio.settings.lease, "hold", "30")  # the same runtime folder: the same lease
    try:
        assert read_line(holder) == "HELD"
        async with Client(build_server(studio)) as client:
            started = await client.call_tool("generate_character", {
                "character": "luca", "scene_description": "x", "run_as_job": True, **SMALL})
            job_id = started.structured_content["job_id"]
            seen = None
            for _ in range(100):
                info = (await client.call_tool("get_job", {"job_id": job_id})).structured_content
                if info["state"] == "running":
                    seen = info
                    break
                await anyio.sleep(0.05)
            assert seen is not None and "waiting for the GPU lease" in seen["message"], seen
            with anyio.fail_after(60):
                while info["state"] in ("queued", "running"):
                    await anyio.sleep(0.1)
                    info = (await client.call_tool("get_job", {"job_id": job_id})).structured_content
            assert info["state"] == "failed" and "GPU is busy: held by" in info["error"], info  # after 2 s
            assert "acquire_timeout_s" in info["error"]
    finally:
        holder.kill()
        holder.wait(5)
        studio.close()
