"""A real `mcp-sdxl serve --http` process shared by this module, driven by the SDK's streamable-HTTP
client: bearer token and loopback binding, progress, cancel, jobs that outlive their client, a batch of
8 under the 1 MiB result limit, arrival order and the busy error."""

from __future__ import annotations

import json
import time

import anyio
import httpx2
import psutil
import pytest
from mcp_procs import (
    private_home,
    cancel_after_progress,
    HttpServer,
    assert_store_consistent,
    configure,
    poll_job,
    server_env,
    small,
    text_of,
    wire_size,
)

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-token-for-tests"
LONG = small(steps=100, width=256, height=256, num_candidates=2)


@pytest.fixture(scope="module")
def http_server(tmp_path_factory, tiny_cache):
    home, config_dir = private_home(tmp_path_factory.mktemp("http"), tiny_cache)
    configure(config_dir, server={"queue_limit": 3, "job_budget_s": 1e6, "max_result_bytes": 1_048_576})
    # No host in --http: it must bind the loopback address. The token comes from the environment.
    port_server = HttpServer(home, config_dir, env=server_env(home, MCP_SDXL_TOKEN=TOKEN))
    port_server.http = f":{port_server.port}"
    port_server.token = TOKEN
    port_server.start()
    yield port_server
    # SIGTERM: uvicorn shuts down, then the signal is re-raised so the process dies of it (as systemd expects)
    assert port_server.stop() in (0, -15), port_server.log()
    assert "Traceback" not in port_server.log(), port_server.log()
    assert_store_consistent(home / "outputs")


async def test_loopback_by_default_and_bearer_token(http_server):
    listening = [c.laddr for c in psutil.Process(http_server.pid).net_connections("inet") if c.status == "LISTEN"]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening

    hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    async with httpx2.AsyncClient() as http:
        for auth in (None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"{TOKEN}", "Bearer"):
            extra = {"Authorization": auth} if auth else {}
            response = await http.post(http_server.url, json=hello, headers={**headers, **extra})
            assert response.status_code == 401, (auth, response.status_code)
            assert response.headers["www-authenticate"] == "Bearer"
        ok = await http.post(http_server.url, json=hello, headers={**headers, "Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200, ok.text
        # the scheme name is case-insensitive (RFC 7235)
        ok = await http.post(http_server.url, json=hello, headers={**headers, "Authorization": f"bearer {TOKEN}"})
        assert ok.status_code == 200, ok.text

    with pytest.raises(Exception):  # noqa: B017 - the SDK raises its own error type for HTTP 401
        async with http_server.client(token=None) as client:
            await client.list_tools()
    async with http_server.client() as client:
        result = await client.call_tool("list_characters", {})
        assert not result.is_error and result.structured_content["profile"] == "tiny"


async def test_progress_cancel_and_next_call_over_http(http_server):
    output = http_server.home / "outputs"
    before = assert_store_consistent(output)
    async with http_server.client() as client:
        events = []

        async def on_progress(progress, total, message):
            events.append((progress, total, message))

        result = await client.call_tool("generate_character", small(steps=2, num_candidates=3, seed=40),
                                        progress_callback=on_progress)
        assert not result.is_error, text_of(result)
        assert events == [(1, 6, "image 1/3, step 1/2"), (2, 6, "image 1/3, step 2/2"),
                          (3, 6, "image 2/3, step 1/2"), (4, 6, "image 2/3, step 2/2"),
                          (5, 6, "image 3/3, step 1/2"), (6, 6, "image 3/3, step 2/2")]
        kept = assert_store_consistent(output)
        assert len(kept) == len(before) + 3

        async def running_job():
            return (await client.call_tool("gpu_status", {})).structured_content["queue"]["running"]

        seen_at_cancel, cancelled_at, running = await cancel_after_progress(client, LONG, running_job)
        info, _ = await poll_job(client, running["job_id"], until=("cancelled", "done", "failed"), every=0.01)
        stop_s = time.perf_counter() - cancelled_at
        assert info["state"] == "cancelled", info
        assert info["progress"]["done"] - seen_at_cancel <= 2
        t0 = time.perf_counter()
        result = await client.call_tool("generate_character", small(seed=41))
        assert not result.is_error, text_of(result)
        print(f"\nhttp: job cancelled {stop_s * 1000:.0f} ms after the client cancelled; "
              f"next call {1000 * (time.perf_counter() - t0):.0f} ms")
        assert stop_s < 5
    assert len(assert_store_consistent(output)) == len(kept) + 1


async def test_job_survives_its_client(http_server):
    async with http_server.client() as first:
        submitted = await first.call_tool("generate_character", small(steps=30, width=128, height=128,
                                                                      num_candidates=2, run_as_job=True))
        job_id = submitted.structured_content["job_id"]
    # The first client is gone (its session was deleted); another one picks the job up.
    async with http_server.client() as second:
        info, _ = await poll_job(second, job_id)
        assert info["state"] == "done", info
        ids = [i["id"] for i in info["result"]["images"]]
        assert len(ids) == 2
        for image_id in ids:
            assert (await second.read_resource(f"sdxl://images/{image_id}")).contents[0].blob


async def test_batch_of_8_stays_under_1_mib(http_server):
    """256 px noise-like images are the worst case for preview sizes; the server's budget is at the
    config maximum (1 MiB) here, so the JSON-RPC framing and escaping must fit too."""
    async with http_server.client() as client:
        result = await client.call_tool("generate_character", small(num_candidates=8, width=256, height=256,
                                                                    seed=100))
        assert not result.is_error, text_of(result)
        size = wire_size(result)
        data = json.loads(result.content[0].text)
        assert data == result.structured_content
        ids = [i["id"] for i in data["images"]]
        assert len(ids) == 8 and sorted(i["seed"] for i in data["images"]) == list(range(100, 108))
        previews = [c for c in result.content if c.type == "image"]
        links = [c for c in result.content if c.type == "resource_link"]
        assert previews and [c.uri for c in links] == [f"sdxl://images/{i}" for i in ids]
        for image_id in ids:
            png = await client.read_resource(f"sdxl://images/{image_id}")
            assert png.contents[0].mime_type == "image/png" and png.contents[0].blob
            meta = json.loads((await client.read_resource(f"sdxl://images/{image_id}/metadata")).contents[0].text)
            assert meta["id"] == image_id and meta["width"] == 256
        png_total = sum((http_server.home / "outputs" / f"{i}.png").stat().st_size for i in ids)
        print(f"\nbatch of 8 (256 px): result {size} bytes on the wire ({len(previews)} inline previews, "
              f"{len(links)} links); the PNGs are {png_total} bytes")
        assert size < 1_048_576


async def test_unknown_and_bad_resource_ids_are_clear(http_server):
    from mcp.shared.exceptions import MCPError

    async with http_server.client() as client:
        with pytest.raises(MCPError, match="no image with id 'img_20200101-000000_00000000'"):
            await client.read_resource("sdxl://images/img_20200101-000000_00000000")
        with pytest.raises(MCPError, match="is not an image id"):
            await client.read_resource("sdxl://images/img_1")
        with pytest.raises(MCPError, match="unknown resource .*; resources: sdxl://characters"):
            await client.read_resource("sdxl://images/..%2F..%2Fetc%2Fpasswd")


async def test_arrival_order_and_busy_error_over_http(http_server):
    """A background job holds the engine; three clients call in turn (seeds 5, 3, 9), each waiting in
    the queue; a fourth gets the busy error (queue_limit 3); they finish in arrival order."""
    async with http_server.client() as control:
        blocker = await control.call_tool("generate_character", {**LONG, "run_as_job": True})
        blocker_id = blocker.structured_content["job_id"]
        await poll_job(control, blocker_id, until=("running",), every=0.02)

        async def waiting() -> int:
            return (await control.call_tool("gpu_status", {})).structured_content["queue"]["waiting"]

        finished: list[tuple[int, float, object]] = []
        async with anyio.create_task_group() as tg:
            async def call(seed):
                async with http_server.client() as client:
                    result = await client.call_tool("generate_character", small(seed=seed))
                    finished.append((seed, time.perf_counter(), result))

            for n, seed in enumerate((5, 3, 9), start=1):
                tg.start_soon(call, seed)
                with anyio.fail_after(30):
                    while await waiting() < n:
                        await anyio.sleep(0.02)
            busy = await control.call_tool("generate_character", small(seed=77))
            assert busy.is_error
            assert "busy: 4 calls ahead of this one (queue limit 3); retry in a little while" in text_of(busy)
            stopped = await control.call_tool("cancel_job", {"job_id": blocker_id})
            assert stopped.structured_content["state"] == "cancelled"
        assert [seed for seed, _, _ in finished] == [5, 3, 9]
        created = []
        for seed, _, result in finished:
            assert not result.is_error, text_of(result)
            image_id = result.structured_content["images"][0]["id"]
            meta = json.loads((await control.read_resource(f"sdxl://images/{image_id}/metadata")).contents[0].text)
            assert meta["seed"] == seed
            created.append(meta["created_at"])
        assert created == sorted(created)
