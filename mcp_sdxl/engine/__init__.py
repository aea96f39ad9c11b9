"""The SDXL engine room: pipelines, LoRAs, ControlNets, VRAM. No MCP here."""

from mcp_sdxl.engine.engine import ControlInput, Engine, GenerationOutput, GenerationRequest
from mcp_sdxl.engine.lora import LoraSpec

__all__ = ["ControlInput", "Engine", "GenerationOutput", "GenerationRequest", "LoraSpec"]
