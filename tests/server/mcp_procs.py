"""Helpers for driving real `mcp-sdxl serve` processes with the SDK's client (stdio and streamable
HTTP), editing configs the way a user would, and looking at what the server left on disk."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]

# Tiny and fast: 64x64 is the tiny UNet's smallest size; two denoising steps.
SMALL = {"character": "luca", "scene_description": "waving at the camera", "width": 64, "height": 64, "steps": 2,
         "filter_consistency": False}


def small(**overrides) -> dict[str, Any]:
    return {**SMALL, **overrides}


def configure(config_dir: Path, **sections: dict) -> None:
    """Deep-update YAML configs: configure(cfg, server={...}, limits={...}, tiny={...}, lease={...})."""
    sdxl = config_dir / "sdxl_config.yaml"
    data = yaml.safe_load(sdxl.read_text())
    data["server"].update(sections.pop("server", {}))
    data["generation"]["limits"].update(sections.pop("limits", {}))
    data["tiny"].update(sections.pop("tiny", {}))
    sdxl.write_text(yaml.safe_dump(data, sort_keys=False))
    if "lease" in sections or "llm" in sections:
        path = config_dir / "lease.yaml"
        lease = yaml.safe_load(path.read_text()) or {}
        lease.update(sections.pop("lease", {}))
        lease.setdefault("llm", {}).update(sections.pop("llm", {}))
        path.write_text(yaml.safe_dump(lease, sort_keys=False))
    assert not sections, f"unknown config sections {sorted(sections)}"


def private_home(root: Path, tiny_cache: Path) -> tuple[Path, Path]:
    """Under `root`: a data home linked to the session's tiny build, and a copy of configs/ whose lease
    folder is private (never the machine's real one). Returns (home, config_dir)."""
    import shutil

    home = root / "home"
    home.mkdir()
    (home / "tiny").symlink_to(tiny_cache, target_is_directory=True)
    config_dir = root / "configs"
    shutil.copytree(REPO / "configs", config_dir)
    configure(config_dir, lease={"runtime_dir": str(root / "runtime")})
    return home, config_dir


def server_env(home: Path, **extra: str) -> dict[str, str]:
    """What a client must pass explicitly (stdio children inherit almost nothing). One OpenMP thread:
    on a busy 2-core machine the default spinning threads made the tiny engine 10-40x slower."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}


def serve_args(home: Path, config_dir: Path, *extra: str) -> list[str]:
    return ["-m", "mcp_sdxl", "serve", "--profile", "tiny", "--home", str(home), "--config-dir", str(config_dir), *extra]


def stdio_params(home: Path, config_dir: Path):
    from mcp import StdioServerParameters

    return StdioServerParameters(command=sys.executable, args=serve_args(home, config_dir), env=server_env(home),
                                 cwd=str(REPO))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class HttpServer:
    """`mcp-sdxl serve --http HOST:PORT` as a subprocess; stderr goes to a log file."""

    def __init__(self, home: Path, config_dir: Path, *, token: str | None = None, http: str | None = None,
                 env: dict[str, str] | None = None):
        self.home, self.config_dir, self.token = Path(home), Path(config_dir), token
        self.port = free_port()
        self.http = http or f"127.0.0.1:{self.port}"
        self.env = env
        self.log_path = self.home / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 90) -> HttpServer:
        extra = ["--http", self.http] + (["--token", self.token] if self.token else [])
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen([sys.executable, *serve_args(self.home, self.config_dir, *extra)],
                                     env=self.env or server_env(self.home), cwd=str(REPO),
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return self
            time.sleep(0.1)
        raise AssertionError(f"server did not listen within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def kill(self) -> None:
        """SIGKILL: no handler, no atexit, nothing runs."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM and wait; returns the exit status (None: it had to be killed)."""
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is not None:
                return self.proc.returncode
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                return None
        finally:
            self._log.close()

    def client(self, token: str | None = "default", **kwargs):
        """A Client for this server; token 'default' means the server's own token."""
        return http_client(self.url, self.token if token == "default" else token, **kwargs)


@contextlib.asynccontextmanager
async def http_client(url: str, token: str | None = None, **kwargs):
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with create_mcp_http_client(headers=headers) as http:
        assert isinstance(http, httpx2.AsyncClient)
        async with Client(streamable_http_client(url, http_client=http), **kwargs) as client:
            yield client


# ---------------------------------------------------------------------------- what is on disk
def store_files(output_dir: Path) -> list[str]:
    """Every name in the output folder, hidden ones included (temp files, journals)."""
    return sorted(p.name for p in Path(output_dir).iterdir()) if Path(output_dir).exists() else []


def assert_store_consistent(output_dir: Path) -> list[str]:
    """No temp files, no journals, every PNG complete with its sidecar; returns the image ids."""
    from PIL import Image

    names = store_files(output_dir)
    leftovers = [n for n in names if n.startswith(".")]
    assert not leftovers, f"leftover temp/journal files: {leftovers}"
    pngs = sorted(n[:-4] for n in names if n.endswith(".png"))
    sidecars = sorted(n[:-5] for n in names if n.endswith(".json"))
    assert pngs == sidecars, (pngs, sidecars)
    for image_id in pngs:
        with Image.open(Path(output_dir) / f"{image_id}.png") as img:
            img.load()  # a truncated PNG raises here
    return pngs


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, float]]:
    """path -> (size, mtime) for every file under root, except under `skip` folders."""
    out = {}
    skip = tuple(Path(s).resolve() for s in skip)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath).resolve()
        if any(here == s or here.is_relative_to(s) for s in skip):
            dirnames[:] = []
            continue
        for name in filenames:
            path = here / name
            with contextlib.suppress(OSError):
                st = path.lstat()
                out[str(path)] = (st.st_size, st.st_mtime)
    return out


def wire_size(result) -> int:
    """Bytes of the JSON-RPC response carrying `result` (as the SDK serializes it, camelCase)."""
    body = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    return len(json.dumps({"jsonrpc": "2.0", "id": 1, "result": body}, ensure_ascii=False).encode())


def text_of(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


async def poll_job(client, job_id: str, until=("done", "failed", "cancelled"), timeout: float = 60, every: float = 0.1):
    """get_job until its state is one of `until`; returns (structured info, last result)."""
    import anyio

    with anyio.fail_after(timeout):
        while True:
            result = await client.call_tool("get_job", {"job_id": job_id})
            assert not result.is_error, text_of(result)
            info = result.structured_content
            if info["state"] in until:
                return info, result
            await anyio.sleep(every)


async def cancel_after_progress(client, arguments: dict, find_job, at: int = 3) -> tuple[float, float, dict]:
    """Call generate_character(arguments) with a progress callback and cancel the client's call (its
    task's cancel scope, as a client does when the user stops it) once `at` steps were reported.

    `find_job()` (async) names the job behind the call while it runs. Returns (the last progress the client
    saw, perf_counter() at the cancel, that job)."""
    import anyio

    progressed, seen = anyio.Event(), []

    async def on_progress(progress, total, message):
        seen.append(progress)
        if progress >= at:
            progressed.set()

    async with anyio.create_task_group() as tg:
        scope = anyio.CancelScope()

        async def call():
            with scope:
                result = await client.call_tool("generate_character", arguments, progress_callback=on_progress)
                raise AssertionError(f"the call should have been cancelled: {text_of(result)}")

        tg.start_soon(call)
        with anyio.fail_after(60):
            await progressed.wait()
        running = await find_job()
        cancelled_at = time.perf_counter()
        scope.cancel()
    return seen[-1], cancelled_at, running
