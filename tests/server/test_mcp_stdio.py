"""A real `mcp-sdxl serve` over stdio, driven by the SDK's client as Claude Desktop or Qwen-Agent would:
progress notifications, cancelling a call, the job tools, and what a disconnect leaves behind."""

from __future__ import annotations

import json
import time

import anyio
import pytest
from mcp import Client
from mcp_procs import (
    assert_store_consistent,
    cancel_after_progress,
    configure,
    poll_job,
    small,
    stdio_params,
    text_of,
    wire_size,
)

pytestmark = pytest.mark.anyio

# After a cold first call the engine estimates a 10 s tiny call at hours (warm-up counted as step cost),
# so tests that need a call to wait for its result raise the job budget out of the way.
NO_JOB_BUDGET = 1e6
LONG = small(steps=100, width=256, height=256, num_candidates=2)  # seconds of work on the tiny engine


async def _wait_running(client, timeout: float = 60) -> dict:
    """gpu_status until a job is running and has made progress; returns that job's summary."""
    with anyio.fail_after(timeout):
        while True:
            status = (await client.call_tool("gpu_status", {})).structured_content
            running = status["queue"]["running"]
            if running and running["progress"]:
                return running
            await anyio.sleep(0.02)


async def test_progress_and_cancel_over_stdio(home, config_dir):
    # The engine's time estimate is far off on the tiny engine (see NO_JOB_BUDGET): keep calls synchronous.
    configure(config_dir, server={"job_budget_s": NO_JOB_BUDGET})
    output = home / "outputs"
    async with Client(stdio_params(home, config_dir)) as client:
        events = []

        async def on_progress(progress, total, message):
            events.append((progress, total, message))

        result = await client.call_tool("generate_character", small(steps=3, num_candidates=4, seed=11),
                                        progress_callback=on_progress)
        assert not result.is_error, text_of(result)
        assert [e[0] for e in events] == list(range(1, 13)), events
        assert all(e[1] == 12 for e in events)
        assert [e[2] for e in events[:4]] == ["image 1/4, step 1/3", "image 1/4, step 2/3", "image 1/4, step 3/3",
                                               "image 2/4, step 1/3"]
        assert events[-1][2] == "image 4/4, step 3/3"
        assert [i["seed"] for i in result.structured_content["images"]] == [11, 12, 13, 14]
        kept = assert_store_consistent(output)
        assert len(kept) == 4

        # Cancel the call from the client side once it is a few steps in.
        seen_at_cancel, cancelled_at, running = await cancel_after_progress(
            client, LONG, lambda: _wait_running(client))  # the job behind the call (a second request, concurrently)
        info, _ = await poll_job(client, running["job_id"], until=("cancelled", "done", "failed"), every=0.01)
        engine_free_s = time.perf_counter() - cancelled_at
        assert info["state"] == "cancelled", info
        steps_after = info["progress"]["done"] - seen_at_cancel
        assert steps_after <= 2, f"{steps_after} steps ran after the cancel"
        # The next call works at once and the cancelled one left nothing.
        t0 = time.perf_counter()
        result = await client.call_tool("generate_character", small(seed=21))
        next_call_s = time.perf_counter() - t0
        assert not result.is_error, text_of(result)
        after = assert_store_consistent(output)
        assert len(after) == 5 and set(kept) < set(after)
        print(f"\nstdio: job cancelled {engine_free_s * 1000:.0f} ms after the client cancelled "
              f"({steps_after} step(s) later); next call took {next_call_s * 1000:.0f} ms")
        assert engine_free_s < 5
    assert_store_consistent(output)


async def test_jobs_over_stdio_and_disconnect(home, config_dir):
    configure(config_dir, server={"job_ttl_s": 3})
    output = home / "outputs"
    async with Client(stdio_params(home, config_dir)) as client:
        submitted = await client.call_tool("generate_character", small(num_candidates=3, run_as_job=True))
        assert not submitted.is_error, text_of(submitted)
        job_id = submitted.structured_content["job_id"]
        info, result = await poll_job(client, job_id)
        assert info["state"] == "done" and info["progress"] == {"done": 6, "total": 6, "message": "image 3/3, step 2/2"}
        ids = [i["id"] for i in info["result"]["images"]]
        assert len(ids) == 3 and wire_size(result) < 1_048_576
        assert [c.uri for c in result.content if c.type == "resource_link"] == [f"sdxl://images/{i}" for i in ids]
        for image_id in ids:
            assert (await client.read_resource(f"sdxl://images/{image_id}")).contents[0].blob

        # cancel_job stops a running job within a step or two and keeps nothing
        long = await client.call_tool("generate_character", {**LONG, "run_as_job": True})
        long_id = long.structured_content["job_id"]
        running = await _wait_running(client)
        assert running["job_id"] == long_id
        before = (await client.call_tool("get_job", {"job_id": long_id})).structured_content["progress"]["done"]
        t0 = time.perf_counter()
        stopped = await client.call_tool("cancel_job", {"job_id": long_id})
        cancel_s = time.perf_counter() - t0
        assert stopped.structured_content["state"] == "cancelled", stopped.structured_content
        steps_after = stopped.structured_content["progress"]["done"] - before
        print(f"\nstdio cancel_job: {cancel_s * 1000:.0f} ms round trip, {steps_after} step(s) after the last poll")
        assert steps_after <= 3 and cancel_s < 5
        assert sorted(assert_store_consistent(output)) == sorted(ids)

        # expiry (job_ttl_s: 3 in this config)
        await anyio.sleep(3.2)
        gone = await client.call_tool("get_job", {"job_id": job_id})
        assert gone.is_error and "unknown or expired" in text_of(gone) and "3 s" in text_of(gone)

        # disconnect while a job runs: the stdio server ends with its client, cancelling the job
        left = await client.call_tool("generate_character", {**LONG, "run_as_job": True})
        left_id = left.structured_content["job_id"]
        await _wait_running(client)
        closing = time.perf_counter()
    exit_s = time.perf_counter() - closing
    print(f"stdio server gone {exit_s * 1000:.0f} ms after its client closed with a job running")
    assert exit_s < 3  # typically < 1 s: it ends by itself (the SDK would send SIGTERM after 2 s)
    # The server process has exited (the SDK waits for it): nothing partial, the lease is free.
    assert sorted(assert_store_consistent(output)) == sorted(ids)

    async with Client(stdio_params(home, config_dir)) as client:
        listed = (await client.call_tool("list_images", {"limit": 50})).structured_content["images"]
        assert sorted(i["id"] for i in listed) == sorted(ids)  # finished results persist in the store
        gone = await client.call_tool("get_job", {"job_id": left_id})
        assert gone.is_error and "a restart forgets them" in text_of(gone)
        status = (await client.call_tool("gpu_status", {})).structured_content
        assert status["lease"]["state"] == "free"
        result = await client.call_tool("generate_character", small())
        assert not result.is_error, text_of(result)


class RawStdio:
    """The server as a subprocess spoken to line by line (what a client's framing bugs send), initialized."""

    def __init__(self, home, config_dir):
        import queue
        import subprocess
        import sys
        import threading

        from mcp_procs import REPO, serve_args, server_env

        self.proc = subprocess.Popen([sys.executable, *serve_args(home, config_dir)], cwd=REPO, env=server_env(home),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()
        self.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}))
        assert "result" in self.answer(1)
        self.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))

    def send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def next_message(self) -> dict:
        return json.loads(self.lines.get(timeout=60))  # queue.Empty: no answer (the SDK alone drops such lines)

    def answer(self, request_id: int) -> dict:
        while True:
            message = self.next_message()
            if message.get("id") == request_id:
                return message

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def test_a_lone_surrogate_from_a_client_is_answered(home, config_dir):
    """A JavaScript client that cuts a model's text inside an emoji sends a lone surrogate escape. The
    SDK's parser dropped such a line without an answer (the client waited for its timeout); now the
    call is answered, the surrogate read as U+FFFD."""
    raw = RawStdio(home, config_dir)
    try:
        # written by hand: json.dumps would not produce a lone surrogate escape from a Python str
        raw.send('{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "generate_character", '
                 '"arguments": {"character": "luca\\ud83d", "scene_description": "waving \\ud83d"}}}')
        reply = raw.answer(2)
        text = reply["result"]["content"][0]["text"]
        assert reply["result"]["isError"] and "unknown character 'luca\ufffd'" in text and "luca" in text
        raw.send(json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "list_images", "arguments": {"limit": 1}}}))
        assert "result" in raw.answer(3)  # still serving
    finally:
        raw.close()


def test_lines_that_are_not_json_rpc_are_answered_and_the_server_stays_up(home, config_dir):
    """The SDK answered nothing to a line it could not read (the client waited for its timeout), and a line
    nested 1,000 deep raised a RecursionError that ended the server. Each now gets a JSON-RPC error with id
    null (-32700 not JSON, -32600 not a message), as over HTTP, and the next call is served."""
    raw = RawStdio(home, config_dir)
    try:
        deep = "[" * 1000 + "]" * 1000
        for line, code in (("not json", -32700), ('{"jsonrpc": "2.0", "id": 5, "method": "tools/call", '
                           '"params": {"name": "list_images", "arguments": {"limit": ' + deep + '}}}', None),
                           ('{"hello": 1}', -32600)):
            raw.send(line)
            reply = raw.next_message()
            assert reply["id"] is None and "error" in reply, reply
            if code is not None:
                assert reply["error"]["code"] == code
        raw.send(json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "list_images", "arguments": {"limit": 1}}}))
        assert raw.next_message().get("id") == 3 and raw.proc.poll() is None  # still serving
    finally:
        raw.close()
