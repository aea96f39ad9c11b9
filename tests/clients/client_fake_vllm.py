"""A fake vLLM OpenAI server (started with --enable-sleep-mode, VLLM_SERVER_DEV_MODE=1) for the
Qwen-Agent assistant test: real HTTP on 127.0.0.1, chat completions (streamed or not) answered by a
script, and the sleep endpoints the GPU lease uses. Like a real vLLM, a sleeping engine cannot
answer a chat: such a request gets 503 and is recorded in `chat_while_sleeping`.
Waking takes `wake_delay_s` (a real level-1 wake takes 0.3-6 s)."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "Qwen/Qwen3-8B"


class FakeVllm:
    def __init__(self, script: Callable[[list[dict]], str], wake_delay_s: float = 1.5):
        self.script = script  # messages -> the assistant's whole reply text
        self.wake_delay_s = wake_delay_s
        self.sleeping = False
        self.waking = False
        self.trace: list[str] = []
        self.chats: list[dict] = []  # request bodies, in order
        self.chat_while_sleeping: list[int] = []  # indexes into chats
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                return json.loads(raw) if raw else None

            def _json(self, status: int, reply) -> None:
                data = b"" if reply is None else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                with fake.lock:
                    fake.trace.append(f"GET {path}")
                if path == "/is_sleeping":
                    self._json(200, {"is_sleeping": fake.sleeping})
                elif path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
                else:
                    self._json(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                parsed = urllib.parse.urlsplit(self.path)
                body = self._body()
                with fake.lock:
                    fake.trace.append(f"POST {parsed.path}" + (f"?{parsed.query}" if parsed.query else ""))
                if parsed.path == "/sleep":
                    fake.sleeping = True
                    self._json(200, None)
                elif parsed.path == "/wake_up":
                    fake.waking = True
                    time.sleep(fake.wake_delay_s)
                    fake.sleeping = fake.waking = False
                    self._json(200, None)
                elif parsed.path in ("/collective_rpc", "/reset_prefix_cache"):
                    self._json(200, None)
                elif parsed.path == "/v1/completions":  # the lease's 1-token warm-up
                    if fake.sleeping:
                        self._json(503, {"error": "engine is sleeping"})
                    else:
                        self._json(200, {"choices": [{"text": "!", "index": 0, "finish_reason": "length"}]})
                elif parsed.path == "/v1/chat/completions":
                    self._chat(body)
                else:
                    self._json(404, {"detail": "Not Found"})

            def _chat(self, body: dict) -> None:
                with fake.lock:
                    index = len(fake.chats)
                    fake.chats.append(body)
                    asleep = fake.sleeping
                    fake.trace[-1] = f"chat#{index + 1}" + (" (SLEEPING)" if asleep else "")
                    if asleep:
                        fake.chat_while_sleeping.append(index)
                if asleep:
                    self._json(503, {"error": {"message": "the engine is sleeping (POST /wake_up first)",
                                               "type": "ServiceUnavailable", "code": 503}})
                    return
                text = fake.script(body["messages"])
                base = {"id": f"chatcmpl-{index}", "created": int(time.time()), "model": body.get("model", MODEL)}
                if not body.get("stream"):
                    self._json(200, {**base, "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                pieces = [text[i:i + 40] for i in range(0, len(text), 40)] or [""]
                for n, piece in enumerate(pieces):
                    delta = {"role": "assistant", "content": piece} if n == 0 else {"content": piece}
                    self._event({**base, "object": "chat.completion.chunk",
                                 "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                self._event({**base, "object": "chat.completion.chunk",
                             "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _event(self, data: dict) -> None:
                self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # a client that gave up (Qwen-Agent retrying) is not the test's business

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
