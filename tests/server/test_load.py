"""Load: 8 concurrent clients over streamable HTTP, 25 calls each, on the tiny engine. Every call
completes or gets the clear busy error, nothing deadlocks, and the server's resident memory stays
bounded (figures printed: run with -s to see them)."""

from __future__ import annotations

import time

import anyio
import pytest
from mcp_procs import assert_store_consistent, configure, small, text_of

pytestmark = pytest.mark.anyio

CLIENTS, CALLS = 8, 25
BUSY = "busy: "


def _call_for(client_no: int, call_no: int) -> tuple[str, dict]:
    kind = (client_no + call_no) % 5
    if kind == 0:
        return "generate_character", small(seed=client_no * 100 + call_no, character=("luca", "alberto")[client_no % 2])
    if kind in (1, 3):
        return "list_characters", {}
    if kind == 2:
        return "gpu_status", {}
    return "list_images", {"limit": 5}


async def test_eight_clients_twenty_five_calls_each(home, config_dir, http_servers):
    configure(config_dir, server={"queue_limit": 4, "job_budget_s": 1e6})
    server = http_servers(home, config_dir)
    async with server.client() as warm:  # load the engine once: what is measured is the steady state
        assert not (await warm.call_tool("generate_character", small())).is_error
        assert not (await warm.call_tool("list_characters", {})).is_error
    rss_before = server.rss_kb()
    peak = [rss_before]
    outcomes: dict[str, int] = {"ok": 0, "busy": 0}
    generated = []
    failures: list[str] = []

    async def sample_rss():
        while True:
            peak[0] = max(peak[0], server.rss_kb())
            await anyio.sleep(0.25)

    async def one_client(client_no: int):
        async with server.client() as client:
            for call_no in range(CALLS):
                name, args = _call_for(client_no, call_no)
                result = await client.call_tool(name, args)
                text = text_of(result)
                if not result.is_error:
                    outcomes["ok"] += 1
                    if name == "generate_character":
                        generated.append(result.structured_content["images"][0]["id"])
                elif name == "generate_character" and BUSY in text and "queue limit 4" in text:
                    outcomes["busy"] += 1
                else:
                    failures.append(f"{name} {args}: {text}")

    started = time.perf_counter()
    with anyio.fail_after(150):  # a deadlock fails here instead of hanging the suite
        async with anyio.create_task_group() as outer:
            outer.start_soon(sample_rss)
            async with anyio.create_task_group() as tg:
                for n in range(CLIENTS):
                    tg.start_soon(one_client, n)
            outer.cancel_scope.cancel()
    elapsed = time.perf_counter() - started
    rss_after = server.rss_kb()
    total = CLIENTS * CALLS
    print(f"\nload: {total} calls from {CLIENTS} clients in {elapsed:.1f} s ({total / elapsed:.1f} calls/s): "
          f"{outcomes['ok']} ok ({len(generated)} generations), {outcomes['busy']} busy; server RSS "
          f"{rss_before / 1024:.0f} MiB before, {peak[0] / 1024:.0f} MiB peak, {rss_after / 1024:.0f} MiB after")
    assert not failures, failures[:5]
    assert outcomes["ok"] + outcomes["busy"] == total
    assert len(generated) >= CLIENTS  # the engine served, not just refused
    assert rss_after - rss_before < 400 * 1024, (rss_before, rss_after)  # KiB
    # the server still answers, and the store holds exactly the images the clients were given
    async with server.client() as client:
        status = (await client.call_tool("gpu_status", {})).structured_content
        assert status["queue"] == {"limit": 4, "waiting": 0, "running": None}
    stored = assert_store_consistent(home / "outputs")
    assert set(generated) <= set(stored) and len(stored) == len(generated) + 1
