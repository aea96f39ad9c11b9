"""Helpers for the real-client tests: where scripts/setup_clients.sh put each client, the server's
command line and environment as a client must give them, an HTTP server process, and a subprocess
runner that never leaves a process behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

QWEN_PYTHON = REPO / ".venv-qwen" / "bin" / "python"
NODE = REPO / ".clients" / "bin" / "node"
INSPECTOR = REPO / ".clients" / "node_modules" / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build" / "index.js"
SETUP_HINT = "run scripts/setup_clients.sh"
HTTP_TOKEN = "clients-test-token"  # the shared HTTP server's bearer token


def serve_args(home: Path, config_dir: Path, *extra: str) -> list[str]:
    return ["-m", "mcp_sdxl", "serve", "--profile", "tiny", "--home", str(home), "--config-dir", str(config_dir), *extra]


def server_env(home: Path, **extra: str) -> dict[str, str]:
    """Stdio children inherit almost nothing: every client passes what the server needs."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home.parent), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cmd: list[str], *, timeout: float, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """subprocess.run in its own session; on timeout the whole group (client + server it spawned) dies."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd[:3]}... ran past {timeout} s\nstdout:\n{out[-4000:]}\nstderr:\n{err[-6000:]}")
    finally:
        # A stdio server the client failed to stop (the client still exited): end it too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class HttpServer:
    """`mcp-sdxl serve --http 127.0.0.1:PORT` in its own process (as a user runs it); log in a file."""

    def __init__(self, home: Path, config_dir: Path, *, token: str | None = None):
        self.home, self.config_dir, self.token = home, config_dir, token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.log_path = home.parent / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> HttpServer:
        extra = ["--http", f"127.0.0.1:{self.port}"] + (["--token", self.token] if self.token else [])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, *serve_args(self.home, self.config_dir, *extra)],
                                     env=server_env(self.home), cwd=REPO, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return self
            time.sleep(0.1)
        raise AssertionError(f"server did not listen within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:] if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


CLAUDE_CONFIG = REPO / "examples" / "claude_desktop" / "claude_desktop_config.json"


def claude_config_for(home: Path, config_dir: Path, tmp_path: Path) -> Path:
    """examples/claude_desktop/claude_desktop_config.json with this machine's paths put in where a user
    puts theirs; no GPU here, so the tiny engine (env MCP_SDXL_PROFILE) and no CUDA device."""
    import json

    text = CLAUDE_CONFIG.read_text()
    text = text.replace("/home/you/mcp-sdxl/configs", str(config_dir)).replace("/home/you/mcp-sdxl", str(REPO))
    text = text.replace("/home/you/.mcp-sdxl", str(home)).replace("/home/you/", f"{tmp_path}/")
    config = json.loads(text)
    config["mcpServers"]["sdxl"]["env"].update(MCP_SDXL_PROFILE="tiny", CUDA_VISIBLE_DEVICES="")
    path = tmp_path / "claude_desktop_config.json"
    path.write_text(json.dumps(config, indent=1))
    return path
