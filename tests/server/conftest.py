"""Fixtures for the MCP server tests: configs with server limits, real `serve` subprocesses (stdio
and streamable HTTP), and helpers to look at the store and measure results."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for folder in (HERE, HERE.parent / "lease"):  # mcp_procs.py here, lease_fakes.py (fake LLM servers) there
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from mcp_procs import HttpServer


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """In-process engines use one intra-op thread while these tests run (restored afterwards): on a busy
    2-core machine, OpenMP's spinning worker threads made tiny generations 10-40x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def http_servers():
    """Start `serve --http` subprocesses; every one still running is stopped at the end."""
    started: list[HttpServer] = []

    def start(home, config_dir, **kwargs) -> HttpServer:
        server = HttpServer(home, config_dir, **kwargs)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()
