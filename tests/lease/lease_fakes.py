"""Fake LLM servers for the lease tests: real HTTP on 127.0.0.1, behaving as the endpoints are
documented (shared/notes/gpu.md), recording every call in order, able to be slow or fail."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class FakeServer:
    """Subclasses implement handle(method, path, query, body) -> (status, json-able reply)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, object]] = []  # (method, path with query, body)
        self.events = self.calls  # tests may append their own markers to keep one timeline
        self.fail: dict[str, int] = {}  # "POST /sleep" -> HTTP status to answer instead
        self.delay: dict[str, float] = {}  # "POST /sleep" -> seconds to wait before answering
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _serve(self, method: str) -> None:
                parsed = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                key = f"{method} {parsed.path}"
                with fake.lock:
                    fake.calls.append((method, self.path, body))
                time.sleep(fake.delay.get(key, 0))
                if key in fake.fail:
                    status, reply = fake.fail[key], {"error": "injected failure"}
                else:
                    with fake.lock:
                        status, reply = fake.handle(method, parsed.path, urllib.parse.parse_qs(parsed.query), body)
                data = b"" if reply is None else json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out first (what the slow-server tests want)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # a deliberately slow handler must not hold up close()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def handle(self, method: str, path: str, query: dict, body: object) -> tuple[int, object]:
        return 404, {"error": "not found"}

    def trace(self) -> list[str]:
        """Calls as 'METHOD /path?query' strings, in order (markers as they were appended)."""
        return [c if isinstance(c, str) else f"{c[0]} {c[1]}" for c in self.calls]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeVllm(FakeServer):
    """vLLM OpenAI server started with --enable-sleep-mode, VLLM_SERVER_DEV_MODE=1."""

    def __init__(self, sleeping: bool = False) -> None:
        self.sleeping = sleeping
        self.level = 0
        super().__init__()

    def handle(self, method, path, query, body):
        if (method, path) == ("GET", "/is_sleeping"):
            return 200, {"is_sleeping": self.sleeping}
        if (method, path) == ("POST", "/sleep"):
            self.sleeping, self.level = True, int(query.get("level", ["1"])[0])
            return 200, None
        if (method, path) == ("POST", "/wake_up"):
            self.sleeping = False
            return 200, None
        if (method, path) in (("POST", "/collective_rpc"), ("POST", "/reset_prefix_cache")):
            return 200, None
        if (method, path) == ("GET", "/v1/models"):
            return 200, {"object": "list", "data": [{"id": "fake/llm", "object": "model"}]}
        if (method, path) == ("POST", "/v1/completions"):
            if self.sleeping:
                return 500, {"error": "engine is sleeping"}
            return 200, {"choices": [{"text": "!", "index": 0}], "usage": {"completion_tokens": body["max_tokens"]}}
        return 404, {"detail": "Not Found"}


class FakeOllama(FakeServer):
    """Ollama: /api/ps lists loaded models; keep_alive 0 unloads them a little later (async)."""

    def __init__(self, models: list[str], unload_delay_s: float = 0.3) -> None:
        self.loaded: dict[str, float | None] = {m: None for m in models}  # name -> unload time
        self.unload_delay_s = unload_delay_s
        super().__init__()

    def _visible(self) -> list[str]:
        now = time.monotonic()
        return [m for m, t in self.loaded.items() if t is None or t > now]

    def handle(self, method, path, query, body):
        if (method, path) == ("GET", "/api/ps"):
            return 200, {"models": [{"name": m, "model": m, "size_vram": 4_000_000_000} for m in self._visible()]}
        if (method, path) == ("POST", "/api/generate"):
            model = body["model"]
            if body.get("keep_alive") in (0, "0"):
                if model in self.loaded:
                    self.loaded[model] = time.monotonic() + self.unload_delay_s
                return 200, {"model": model, "response": "", "done": True, "done_reason": "unload"}
            self.loaded[model] = None
            return 200, {"model": model, "response": "", "done": True, "done_reason": "load"}
        return 404, {"error": "not found"}


class FakeSglang(FakeServer):
    def handle(self, method, path, query, body):
        if method == "POST" and path in ("/release_memory_occupation", "/resume_memory_occupation"):
            return 200, {"success": True}
        if (method, path) == ("GET", "/v1/models"):
            return 200, {"data": [{"id": "sg/llm"}]}
        if (method, path) == ("POST", "/v1/completions"):
            return 200, {"choices": [{"text": "!"}]}
        return 404, {"detail": "Not Found"}


class FakeLlamaSwap(FakeServer):
    def __init__(self) -> None:
        self.running = ["qwen"]
        super().__init__()

    def handle(self, method, path, query, body):
        if (method, path) == ("GET", "/running"):
            return 200, {"running": [{"model": m, "state": "ready"} for m in self.running]}
        if (method, path) == ("GET", "/unload"):
            self.running = []
            return 200, "OK"
        if (method, path) == ("POST", "/v1/completions"):
            self.running = [body["model"]]
            return 200, {"choices": [{"text": "!"}]}
        return 404, {"error": "not found"}


# ---- helper processes that hold the lease ----------------------------------------------------

HOLDER = r"""
import json, os, sys, time
from mcp_sdxl.config.lease import LeaseConfig
from mcp_sdxl.lease import GpuLease, install_signal_handlers
lease = GpuLease(LeaseConfig.model_validate_json(os.environ["LEASE_CFG"]))
mode = sys.argv[1]
if mode == "recover":
    print(json.dumps(lease.recover()), flush=True)
    sys.exit(0)
if mode in ("hooks", "exit"):
    install_signal_handlers(lease, on_shutdown=lambda: print("ENGINE FREED", flush=True))
lease.acquire("holder test")
print("HELD", flush=True)
if mode == "exit":
    sys.exit(0)  # no release(): the atexit hook must do it
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 60)
lease.release()
print("RELEASED", flush=True)
"""


def spawn(config, *args: str) -> subprocess.Popen:
    """Run HOLDER in a new interpreter; its stdout lines go to proc.lines (a queue)."""
    env = dict(os.environ, LEASE_CFG=config.model_dump_json(), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    proc.lines = queue.Queue()  # type: ignore[attr-defined]

    def pump() -> None:
        for line in proc.stdout:
            proc.lines.put(line.strip())
        proc.lines.put(None)  # EOF

    threading.Thread(target=pump, daemon=True).start()
    return proc


def read_line(proc: subprocess.Popen, timeout: float = 20) -> str:
    try:
        line = proc.lines.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        raise AssertionError(f"helper process said nothing in {timeout} s: {proc.stderr.read()}") from None
    if line is None:
        proc.wait(5)
        raise AssertionError(f"helper process exited {proc.returncode}: {proc.stderr.read()}")
    return line
