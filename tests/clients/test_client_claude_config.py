"""examples/claude_desktop/claude_desktop_config.json: absolute paths, the env the server needs, a command
line the CLI accepts. (test_client_inspector.py starts the server from this very file, as Claude Desktop
would: the Inspector reads the same mcpServers format.)"""

from __future__ import annotations

import json
import os

import pytest
from client_procs import CLAUDE_CONFIG, REPO


def test_claude_desktop_config_shape():
    entry = json.loads(CLAUDE_CONFIG.read_text())["mcpServers"]["sdxl"]
    assert os.path.isabs(entry["command"]) and entry["command"].endswith("/.venv/bin/mcp-sdxl")
    assert (REPO / ".venv" / "bin" / "mcp-sdxl").exists(), "the console script the config names (scripts/setup.sh)"
    args = entry["args"]
    assert args[0] == "serve"
    for flag in ("--config-dir", "--home", "--models-root"):
        assert os.path.isabs(args[args.index(flag) + 1]), flag
    assert {"HF_HOME", "HF_HUB_OFFLINE", "MCP_SDXL_MODELS", "CUDA_VISIBLE_DEVICES"} <= set(entry["env"])
    assert entry["env"]["HF_HUB_OFFLINE"] == "1"
    assert all(os.path.isabs(entry["env"][k]) for k in ("HF_HOME", "MCP_SDXL_MODELS"))

    from mcp_sdxl.cli import main

    with pytest.raises(SystemExit) as help_exit:  # the serve sub-command and its flags exist
        main([*args, "--help"])
    assert help_exit.value.code == 0
