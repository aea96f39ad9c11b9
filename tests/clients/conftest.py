"""Fixtures for the real-client tests (helpers live in client_procs.py): each client's runtime, or a
skip that says how to install it; a data home with face photos; one HTTP server for the HTTP clients."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from client_flow import put_photos
from client_procs import HTTP_TOKEN, INSPECTOR, NODE, QWEN_PYTHON, SETUP_HINT, HttpServer


@pytest.fixture(scope="session")
def qwen_python() -> Path:
    if not QWEN_PYTHON.exists():
        pytest.skip(f"Qwen-Agent is not installed in .venv-qwen/ (qwen-agent + mcp<2, its own venv): {SETUP_HINT}")
    probe = subprocess.run([str(QWEN_PYTHON), "-c", "from qwen_agent.tools.mcp_manager import MCPManager"],
                           check=False, capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f".venv-qwen cannot import Qwen-Agent's MCPManager ({probe.stderr.strip()[-300:]}): {SETUP_HINT}")
    return QWEN_PYTHON


@pytest.fixture(scope="session")
def inspector() -> list[str]:
    """The MCP Inspector launcher as a command prefix: [node, index.js]."""
    if not (NODE.exists() and INSPECTOR.exists()):
        pytest.skip(f"MCP Inspector (npm @modelcontextprotocol/inspector, Node >= 22.19) is not in .clients/: {SETUP_HINT}")
    return [str(NODE), str(INSPECTOR)]


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (its sample photo is the test face): run scripts/setup.sh")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


@pytest.fixture
def client_home(home, settings) -> Path:
    """The data home (tiny engine linked in) with face photos in its input folder."""
    put_photos(settings.input_dirs[0], _package_file("skimage", "data", "astronaut.png"))
    return home


@pytest.fixture(scope="session")
def shared_http_server(tmp_path_factory, tiny_cache):
    """One `serve --http` (bearer token HTTP_TOKEN) for the HTTP clients of the session: the second
    client finds the engine loaded (each flow is self-contained; state they share is harmless)."""
    from mcp_procs import private_home

    from mcp_sdxl.config import load_settings

    home, config_dir = private_home(tmp_path_factory.mktemp("http-clients"), tiny_cache)
    settings = load_settings(config_dir, home=home, profile="tiny")
    put_photos(settings.input_dirs[0], _package_file("skimage", "data", "astronaut.png"))
    server = HttpServer(home, config_dir, token=HTTP_TOKEN).start()
    yield server
    server.stop()
