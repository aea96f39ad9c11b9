"""Jobs, progress, cancellation and queueing: the JobQueue itself, then through the SDK's in-memory client
on the tiny engine (the same code paths the stdio and HTTP tests drive across a process boundary)."""

from __future__ import annotations

import threading
import time

import anyio
import pytest
from mcp import Client
from mcp_procs import assert_store_consistent, cancel_after_progress, configure, poll_job, small, text_of, wire_size

from mcp_sdxl.errors import BusyError, CancelledError, NotFoundError
from mcp_sdxl.server import build_server
from mcp_sdxl.studio.jobs import JobQueue

# ---------------------------------------------------------------------------- the queue alone


def _blocking(gate: threading.Event, log: list, name: str):
    def run(job):
        log.append(name)
        gate.wait(10)
        if job.cancel_event.is_set():
            raise CancelledError("cancelled")
        return name

    return run


def _running(queue: JobQueue, gate: threading.Event, order: list, name: str):
    """Submit a job that holds the worker until `gate` is set; returns it once it runs."""
    job = queue.submit("t", 1, _blocking(gate, order, name))
    while job.state != "running":
        time.sleep(0.005)
    return job


def test_queue_is_fifo_and_busy_error_counts_what_is_ahead():
    queue = JobQueue(limit=2, ttl_s=60)
    gate, order = threading.Event(), []
    try:
        first = _running(queue, gate, order, "first")
        second = queue.submit("t", 1, _blocking(gate, order, "second"))
        third = queue.submit("t", 1, _blocking(gate, order, "third"))
        with pytest.raises(BusyError, match=r"busy: 3 calls ahead of this one \(queue limit 2\)"):
            queue.submit("t", 1, _blocking(gate, order, "fourth"))
        assert queue.ahead_of(third) == 2 and queue.snapshot()["waiting"] == 2
        # A cancelled waiter no longer counts against the limit or as "ahead", and is final at once
        # (cancel_job answers without waiting for the job ahead of it).
        second.cancel()
        assert second.finished.is_set() and second.state == "cancelled" and first.state == "running"
        assert queue.ahead_of(third) == 1
        fourth = queue.submit("t", 1, _blocking(gate, order, "fourth"))
        gate.set()
        for job in (first, second, third, fourth):
            assert job.finished.wait(10)
        assert order == ["first", "third", "fourth"]
        assert (first.state, second.state, third.state) == ("done", "cancelled", "done")
        assert second.error == "cancelled before it started"
    finally:
        gate.set()
        queue.stop()


def test_a_job_cancelled_while_queued_never_runs_and_the_idle_hook_still_comes():
    idle = threading.Event()
    queue = JobQueue(limit=4, ttl_s=60, on_idle=idle.set)
    gate, order = threading.Event(), []
    try:
        first = _running(queue, gate, order, "first")
        last = queue.submit("t", 1, _blocking(gate, order, "last"))
        last.cancel()
        finished_at = last.finished_at
        gate.set()
        assert first.finished.wait(10) and idle.wait(10)
        assert order == ["first"] and last.state == "cancelled" and last.finished_at == finished_at
    finally:
        gate.set()
        queue.stop()


def test_worker_survives_any_exception_and_progress_is_clamped():
    queue = JobQueue(limit=4, ttl_s=60)

    def explode(job):
        raise SystemExit("not from a job")  # even a BaseException must not kill the worker

    def progress(job):
        for done in (1, 1, 3, 2, 9):
            job.report(done, f"step {done}")
        return "ok"

    try:
        bad = queue.submit("t", 1, explode)
        good = queue.submit("t", 4, progress)
        assert good.finished.wait(10) and bad.finished.is_set()
        assert bad.state == "failed" and "not from a job" in bad.error
        assert [e.done for e in good.events] == [1, 3, 4]  # increasing, never past the total
    finally:
        queue.stop()


def test_finished_jobs_expire_with_a_clear_message():
    queue = JobQueue(limit=4, ttl_s=0.2)
    try:
        job = queue.submit("t", 1, lambda job: "ok")
        assert job.finished.wait(10)
        assert queue.get(job.id) is job
        time.sleep(0.3)
        with pytest.raises(NotFoundError, match=r"no job 'job_\w+': unknown or expired.*0.2 s after they finish"):
            queue.get(job.id)
    finally:
        queue.stop()


# ---------------------------------------------------------------------------- through the MCP client


@pytest.fixture
def jobs_studio(config_dir, home):
    from mcp_sdxl.config import load_settings
    from mcp_sdxl.studio import Studio

    configure(config_dir, server={"job_ttl_s": 1.5, "queue_limit": 3, "job_budget_s": 1e6})
    studio = Studio(load_settings(config_dir, home=home, profile="tiny"))
    yield studio
    studio.close()


@pytest.mark.anyio
async def test_progress_cancel_and_next_call(jobs_studio):
    studio, server = jobs_studio, build_server(jobs_studio)
    output = studio.store.output_dir
    async with Client(server) as client:
        events = []

        async def on_progress(progress, total, message):
            events.append((progress, total, message))

        result = await client.call_tool("generate_character", small(steps=3, num_candidates=2, seed=5),
                                        progress_callback=on_progress)
        assert not result.is_error, text_of(result)
        assert [e[0] for e in events] == [1, 2, 3, 4, 5, 6]
        assert {e[1] for e in events} == {6}
        assert events[0][2] == "image 1/2, step 1/3" and events[4][2] == "image 2/2, step 2/3"
        kept = assert_store_consistent(output)
        assert len(kept) == 2

        # Cancel the client's call mid-generation (2 candidates x 100 steps at 256 px: seconds of work).
        async def running_job():
            return studio.jobs.snapshot()["running"]

        seen_at_cancel, cancelled_at, running = await cancel_after_progress(
            client, small(steps=100, width=256, height=256, num_candidates=2), running_job)
        job = studio.jobs.get(running["job_id"])
        assert await anyio.to_thread.run_sync(job.finished.wait, 30)
        latency = time.perf_counter() - cancelled_at
        steps_after = job.progress.done - seen_at_cancel
        assert job.state == "cancelled", (job.state, job.error)
        assert steps_after <= 2, f"{steps_after} steps ran after the cancel"
        assert latency < 5, latency
        print(f"\nin-memory cancel: job stopped {latency * 1000:.0f} ms after the cancel, {steps_after} step(s) later")
        assert assert_store_consistent(output) == kept  # nothing from the cancelled call

        started_next = time.perf_counter()
        result = await client.call_tool("generate_character", small(seed=9))
        assert not result.is_error, text_of(result)
        assert time.perf_counter() - started_next < 10
        assert len(assert_store_consistent(output)) == 3
        assert studio.engine._lock.acquire(timeout=1)  # the engine lock is free
        studio.engine._lock.release()


@pytest.mark.anyio
async def test_job_flow_cancel_and_expiry(jobs_studio):
    studio, server = jobs_studio, build_server(jobs_studio)
    async with Client(server) as client:
        submitted = await client.call_tool("generate_character", small(num_candidates=2, run_as_job=True))
        assert not submitted.is_error, text_of(submitted)
        job_id = submitted.structured_content["job_id"]
        assert submitted.structured_content["status"] == "queued" and "get_job" in text_of(submitted)
        # the queued reply already carries what was asked for (not 0x0, 0 steps)
        queued = submitted.structured_content
        assert queued["character"] == "luca" and queued["width"] > 0 and queued["steps"] > 0 and queued["loras"]
        info, result = await poll_job(client, job_id)
        assert info["state"] == "done" and info["progress"]["done"] == info["progress"]["total"] == 4
        ids = [image["id"] for image in info["result"]["images"]]
        assert len(ids) == 2
        assert [c.name for c in result.content if c.type == "resource_link"] == ids
        assert any(c.type == "image" for c in result.content) and wire_size(result) < 1_048_576
        for image_id in ids:
            assert (await client.read_resource(f"sdxl://images/{image_id}")).contents[0].blob

        # cancel_job on a running job
        long = await client.call_tool("generate_character", small(steps=100, width=256, height=256, run_as_job=True))
        long_id = long.structured_content["job_id"]
        info, _ = await poll_job(client, long_id, until=("running",), every=0.02)
        while not (info.get("progress") or {}).get("done"):
            info, _ = await poll_job(client, long_id, until=("running",), every=0.02)
        before = info["progress"]["done"]
        t0 = time.perf_counter()
        stopped = await client.call_tool("cancel_job", {"job_id": long_id})
        latency = time.perf_counter() - t0
        assert not stopped.is_error and stopped.structured_content["state"] == "cancelled"
        assert stopped.structured_content["progress"]["done"] - before <= 3
        assert latency < 5
        print(f"\ncancel_job returned after {latency * 1000:.0f} ms")
        assert len(assert_store_consistent(studio.store.output_dir)) == 2

        # expiry: job_ttl_s is 1.5 s in this config
        await anyio.sleep(1.7)
        gone = await client.call_tool("get_job", {"job_id": job_id})
        assert gone.is_error and "unknown or expired" in text_of(gone) and "1.5 s" in text_of(gone)
        gone = await client.call_tool("cancel_job", {"job_id": "job_000000000000"})
        assert gone.is_error and "no job" in text_of(gone)
        # the images of an expired job stay in the store
        assert (await client.read_resource(f"sdxl://images/{ids[0]}")).contents[0].blob


@pytest.mark.anyio
async def test_calls_are_served_in_arrival_order_and_queue_limit_is_clear(jobs_studio):
    """A blocker holds the engine; calls that arrive meanwhile run in arrival order; the 4th waiter
    (queue_limit 3) is told how many are ahead."""
    studio, server = jobs_studio, build_server(jobs_studio)
    seeds_run: list[int] = []
    real_generate = studio.engine.generate
    gate = threading.Event()

    def generate(request, **kwargs):
        seeds_run.append(request.seed)
        if request.seed == 1000:
            gate.wait(30)
        return real_generate(request, **kwargs)

    studio.engine.generate = generate
    results: dict[int, object] = {}
    async with Client(server) as client, anyio.create_task_group() as tg:
        async def call(seed):
            results[seed] = await client.call_tool("generate_character", small(seed=seed))

        tg.start_soon(call, 1000)
        while studio.jobs.snapshot()["running"] is None:
            await anyio.sleep(0.01)
        # a job queued behind the blocker says so (its estimate is its own work only), and cancels at once
        queued = await client.call_tool("generate_character", small(seed=9, run_as_job=True))
        assert "s of work, after 1 call(s) ahead of it)" in queued.structured_content["message"]
        cancelled = await client.call_tool("cancel_job", {"job_id": queued.structured_content["job_id"]})
        assert cancelled.structured_content["state"] == "cancelled"
        for seed in (3, 1, 2):
            tg.start_soon(call, seed)
            await anyio.sleep(0.05)
        while studio.jobs.snapshot()["waiting"] < 3:
            await anyio.sleep(0.01)
        busy = await client.call_tool("generate_character", small(seed=77))
        gate.set()
    assert busy.is_error and "busy: 4 calls ahead of this one (queue limit 3)" in text_of(busy)
    assert seeds_run == [1000, 3, 1, 2]
    assert all(not r.is_error for r in results.values())


def test_result_budget_holds_for_8_full_size_noise_images(tmp_path):
    """The worst case for previews: 8 SDXL-size images of pure noise (incompressible), the budget at the
    1 MiB maximum the config allows. The result (JSON text twice, previews, links) must still fit."""
    import numpy as np
    from PIL import Image

    from mcp_sdxl.server import shaping
    from mcp_sdxl.store import ImageStore
    from mcp_sdxl.studio.results import GenerationResult, ImageInfo

    store = ImageStore(tmp_path / "out")
    rng = np.random.default_rng(0)
    infos = []
    for seed in range(8):
        pixels = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
        stored = store.save(Image.fromarray(pixels), {"seed": seed, "width": 1024, "height": 1024, "prompt": "é" * 3000})
        infos.append(ImageInfo(id=stored.id, uri=stored.uri, path=str(stored.path), width=1024, height=1024, seed=seed))
    data = GenerationResult(images=infos, prompt="\"quoted\"\n" * 400, message="8 images")
    for max_bytes in (1_048_576, 300_000):
        result = shaping.image_result(data, [i.model_dump() for i in infos], 768, max_bytes)
        size = wire_size(result)
        previews = [c for c in result.content if c.type == "image"]
        assert size <= max_bytes and previews, (size, len(previews))
        assert result.content[0].type == "text" and len([c for c in result.content if c.type == "resource_link"]) == 8
