"""The tools that change an image that exists: edit_image, upscale_image, regenerate.

Their plans come from Studio (mcp_sdxl.studio.editing) and run through the same queue, progress, cancel
and result shaping as generate_character.
"""

from typing import Annotated

from mcp.server.mcpserver import Context
from mcp.types import CallToolResult, ToolAnnotations
from pydantic import Field

from mcp_sdxl.server.params import (
    AsJob,
    Background,
    Candidates,
    Cfg,
    Negative,
    NotBool,
    OptCharacter,
    Quality,
    Seed,
    Size,
    Steps,
    Strength,
    Style,
    Weight,
)
from mcp_sdxl.server.protocol import tool_errors
from mcp_sdxl.studio.results import GenerationResult

WRITES = ToolAnnotations(readOnlyHint=False, destructiveHint=False, openWorldHint=False)


def add_edit_tools(server, studio, run_generation) -> None:
    """Register the three tools on `server`; `run_generation` queues a plan and shapes its result."""

    @server.tool(annotations=WRITES)
    @tool_errors
    async def edit_image(
        image: Annotated[str, Field(description="the image to change: an id (img_...) or a path under the input folders")],
        prompt: Annotated[str, Field(description="what the result should show (with a character: the scene)")],
        ctx: Context,
        strength: Annotated[float | None, NotBool, Field(description="how much to repaint, 0-1: 0 keeps the source, 0.3 touches up, 0.6 (default) changes a lot, 1 repaints whole")] = None,
        mask: Annotated[str | None, Field(description="inpainting: a black-and-white image of the same size (id or path); white is repainted, black kept exactly")] = None,
        character: OptCharacter = None,
        background: Background = None,
        style: Style = None,
        quality: Quality = None,
        seed: Seed = None,
        width: Annotated[int | None, NotBool, Field(description="output width; default the source's (fitted to the limits)")] = None,
        height: Annotated[int | None, NotBool, Field(description="output height; default the source's (fitted to the limits)")] = None,
        steps: Steps = None,
        cfg_scale: Cfg = None,
        negative_prompt: Negative = None,
        character_weight: Weight = None,
        num_candidates: Candidates = 1,
        run_as_job: AsJob = False,
    ) -> Annotated[CallToolResult, GenerationResult]:
        """Change an existing image with a prompt (SDXL img2img), or with a mask repaint only the white
        part (inpainting; outside the mask the pixels stay the source's). A character adds its LoRA and
        trigger words. Returns the same result as generate_character, with source_image and strength."""
        plan = studio.plan_edit(
            image=image, prompt=prompt, strength=strength, mask=mask, width=width, height=height,
            character=character, background=background, style=style, quality=quality, seed=seed, steps=steps,
            cfg_scale=cfg_scale, negative_prompt=negative_prompt, character_weight=character_weight,
            num_candidates=num_candidates,
        )
        return await run_generation(plan, ctx, run_as_job)

    @server.tool(annotations=WRITES)
    @tool_errors
    async def upscale_image(
        image: Annotated[str, Field(description="the image to enlarge: an id (img_...) or a path under the input folders")],
        ctx: Context,
        factor: Annotated[int, NotBool, Field(description="2 (default), 3 or 4 times the width and height")] = 2,
        prompt: Annotated[str | None, Field(description="what the image shows; default: the source's own prompt")] = None,
        character: OptCharacter = None,
        strength: Annotated[float | None, NotBool, Field(description="how much each tile is repainted, 0-1; default 0.3 (adds detail, keeps the picture)")] = None,
        quality: Quality = None,
        seed: Seed = None,
        negative_prompt: Negative = None,
        run_as_job: AsJob = False,
    ) -> Annotated[CallToolResult, GenerationResult]:
        """Enlarge an image 2x-4x: resized, then repainted tile by tile by SDXL img2img at a low strength
        (tiles keep the memory of one 1024x1024 image). The message says how it was done. Large
        upscales run as a background job: poll get_job."""
        plan = studio.plan_upscale(
            image=image, factor=factor, prompt=prompt, strength=strength, character=character, quality=quality,
            seed=seed, negative_prompt=negative_prompt,
        )
        return await run_generation(plan, ctx, run_as_job)

    @server.tool(annotations=WRITES)
    @tool_errors
    async def regenerate(
        image_id: Annotated[str, Field(description="an image id a generation tool returned (img_...)")],
        ctx: Context,
        seed: Seed = None,
        prompt: Annotated[str | None, Field(description="a new scene description / prompt; default the recorded one")] = None,
        negative_prompt: Negative = None,
        quality: Quality = None,
        steps: Steps = None,
        cfg_scale: Cfg = None,
        width: Size = None,
        height: Size = None,
        character_weight: Weight = None,
        background_weight: Weight = None,
        style_weight: Weight = None,
        pose_strength: Strength = None,
        depth_strength: Strength = None,
        canny_strength: Strength = None,
        control_start: Annotated[float | None, NotBool, Field(description="fraction of steps where control starts, 0-1")] = None,
        control_end: Annotated[float | None, NotBool, Field(description="fraction of steps where control ends, 0-1")] = None,
        strength: Annotated[float | None, NotBool, Field(description="for an edited or upscaled image: the repaint strength 0-1")] = None,
        run_as_job: AsJob = False,
    ) -> Annotated[CallToolResult, GenerationResult]:
        """Make an earlier image again with everything recorded (prompt, LoRAs and weights, controls,
        size, steps, seed, source image) except what you override here. Without overrides it is the
        same image; change seed for a variation, a weight or a strength to tune one thing."""
        plan = studio.plan_regenerate(
            image_id, seed=seed, prompt=prompt, negative_prompt=negative_prompt, quality=quality, steps=steps,
            cfg_scale=cfg_scale, width=width, height=height, character_weight=character_weight,
            background_weight=background_weight, style_weight=style_weight, pose_strength=pose_strength,
            depth_strength=depth_strength, canny_strength=canny_strength, control_start=control_start,
            control_end=control_end, strength=strength,
        )
        return await run_generation(plan, ctx, run_as_job)
