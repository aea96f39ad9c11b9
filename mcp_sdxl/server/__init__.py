"""The MCP surface of mcp-sdxl (tools, resources, prompts). No torch here."""

from mcp_sdxl.server.app import build_server

__all__ = ["build_server"]
