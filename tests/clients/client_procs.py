"""Helpers for the real-client tests: where scripts/setup_clients.sh put each client, the server's
command line and environment as a client must give them, an HTTP server process, and a subprocess
runner that never leaves a process behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# The server-side helpers (serve arguments, free ports, `serve --http` processes) are shared with the
# server tests.
sys.path.insert(0, str(REPO / "tests" / "server"))
from mcp_procs import HttpServer, free_port, serve_args  # noqa: E402, F401 (re-exported to the client tests)

QWEN_PYTHON = REPO / ".venv-qwen" / "bin" / "python"
NODE = REPO / ".clients" / "bin" / "node"
INSPECTOR = REPO / ".clients" / "node_modules" / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build" / "index.js"
SETUP_HINT = "run scripts/setup_clients.sh"
HTTP_TOKEN = "clients-test-token"  # the shared HTTP server's bearer token


def server_env(home: Path, **extra: str) -> dict[str, str]:
    """Stdio children inherit almost nothing: every client passes what the server needs."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home.parent), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


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
