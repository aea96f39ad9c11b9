"""mcp-sdxl: an MCP tool server for consistent SDXL character images."""

__version__ = "0.1.0"
