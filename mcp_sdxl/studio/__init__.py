"""The application layer (the seed's CharacterGenerator): plans, queues and runs generation."""

from mcp_sdxl.studio.studio import Studio

__all__ = ["Studio"]
