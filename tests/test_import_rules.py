"""Which room of the house may import which (README, "Layout"): checked on every import statement,
including the ones inside functions, so a lazy import cannot cross a wall either."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mcp_sdxl"
HEAVY = {"torch", "diffusers", "transformers", "peft", "compel"}

# room -> the rooms of mcp_sdxl it may import (itself included), and the libraries it must not import
RULES: dict[str, tuple[set[str], set[str]]] = {
    "errors": (set(), HEAVY | {"mcp"}),
    "config": ({"config", "errors"}, HEAVY | {"mcp"}),
    "store": ({"errors"}, HEAVY | {"mcp"}),
    "consistency": ({"config", "consistency", "errors"}, HEAVY | {"mcp"}),
    "lease": ({"config", "errors", "lease"}, HEAVY | {"mcp"}),
    "engine": ({"config", "engine", "errors"}, {"mcp"}),  # no MCP, no studio: it turns requests into images
    "studio": ({"config", "consistency", "engine", "errors", "lease", "store", "studio"}, HEAVY | {"mcp"}),
    "server": ({"errors", "server", "store", "studio"}, HEAVY),  # the MCP surface only: no torch, no engine
    "bench": ({"bench", "config", "engine", "errors"}, {"mcp"}),
}


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("room", sorted(RULES))
def test_rooms_import_only_what_they_may(room):
    allowed, forbidden = RULES[room]
    files = [PACKAGE / f"{room}.py"] if (PACKAGE / f"{room}.py").exists() else sorted((PACKAGE / room).rglob("*.py"))
    assert files, room
    broken = []
    for path in files:
        for line, name in imports(path):
            parts = name.split(".")
            if parts[0] == "mcp_sdxl" and len(parts) > 1 and parts[1] not in allowed:
                broken.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
            elif parts[0] in forbidden:
                broken.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not broken, "\n".join(broken)


def test_every_room_has_a_rule():
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert rooms <= set(RULES), sorted(rooms - set(RULES))
