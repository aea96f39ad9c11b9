"""The MCP surface: tools, resources and prompts over one Studio. No torch here.

Tool inputs are flat (strings, numbers, booleans, lists of strings): some clients drop `$defs`.
Every failure becomes a tool error whose text says what would work (protocol.py: the error shaping and
the SDK server's dispatch; shaping.py: results and argument messages).
"""

import inspect
import json
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ToolAnnotations
from pydantic import Field

from mcp_sdxl import __version__
from mcp_sdxl.server import shaping
from mcp_sdxl.server.edit_tools import add_edit_tools
from mcp_sdxl.server.params import (
    AsJob,
    Background,
    Candidates,
    Cfg,
    Character,
    Filter,
    ImageRef,
    Negative,
    NotBool,
    OptCharacter,
    Quality,
    Scene,
    Seed,
    Size,
    Steps,
    Strength,
    Style,
    Weight,
)
from mcp_sdxl.server.protocol import StudioServer, resource_errors, tool_errors
from mcp_sdxl.studio.results import GenerationResult, JobInfo

log = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"

INSTRUCTIONS = """\
mcp-sdxl makes consistent 3D-animation character images with SDXL.
Start with list_characters (characters, backgrounds, styles, pose presets). Use generate_character for a
character in a scene, generate_with_control to fix pose/depth/edges from an image or a pose preset, and
score_consistency to check a face matches the character. Images are referred to by id (img_...).
Long calls return a job_id: poll get_job. Call release_gpu when done so the local LLM gets the GPU back."""

def build_server(studio) -> MCPServer:
    """An MCPServer whose tools call `studio` (a mcp_sdxl.studio.Studio)."""
    server = StudioServer(name="mcp-sdxl", version=__version__, instructions=INSTRUCTIONS)
    limits = studio.settings.sdxl.server

    async def run_generation(plan, ctx: Context, run_as_job: bool) -> CallToolResult:
        # No await between the call's arrival and submit(): calls queue in the order they came in.
        estimate = studio.estimate_seconds(plan)  # arithmetic only
        job = studio.submit(plan)
        if run_as_job or estimate > limits.job_budget_s:
            info = studio.job_info(job)
            after = f", after {info.ahead} call(s) ahead of it" if info.ahead else ""
            info.message = (
                f"running as a background job (estimated {estimate:.0f} s of work{after}); poll "
                f"get_job('{job.id}') every few seconds; cancel_job stops it"
            )
            return shaping.data_result(studio.planned_result(
                plan, status="queued", job_id=job.id, estimated_seconds=round(estimate, 1), message=info.message))
        finished = await wait_for_job(job, ctx, limits.job_budget_s)
        if not finished:
            return shaping.data_result(studio.planned_result(
                plan, status=job.state, job_id=job.id, estimated_seconds=round(estimate, 1),
                message=f"still running; poll get_job('{job.id}') for the result",
            ))
        return job_outcome(job)

    def job_outcome(job, data=None) -> CallToolResult:
        """The finished job's images as a result; `data` (default: the GenerationResult) is its JSON."""
        if job.state == "done":
            result: GenerationResult = job.result
            result.job_id = job.id
            images = [i.model_dump() for i in result.images] + [
                {**c.model_dump(), "description": "control map"} for c in result.control_images
            ]
            return shaping.image_result(data or result, images, limits.preview_max_px, limits.max_result_bytes)
        raise ToolError(job.error or f"job {job.id} {job.state}")

    # ------------------------------------------------------------------ tools
    @server.tool(annotations=ToolAnnotations(readOnlyHint=True, idempotentHint=True, openWorldHint=False))
    @tool_errors
    async def list_characters() -> dict[str, Any]:
        """List what can be generated: characters (preset prompt, LoRA, trigger words, references),
        backgrounds and styles (LoRAs with default weights), quality presets, pose presets, ControlNets,
        missing LoRA files, the engine profile, and the input folders image paths may come from.
        Call this first; use the names it returns in the other tools."""
        return await anyio.to_thread.run_sync(studio.list_characters)

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False, openWorldHint=False))
    @tool_errors
    async def generate_character(
        character: Character,
        scene_description: Scene,
        ctx: Context,
        background: Background = None,
        style: Style = None,
        quality: Quality = None,
        seed: Seed = None,
        width: Size = None,
        height: Size = None,
        steps: Steps = None,
        cfg_scale: Cfg = None,
        negative_prompt: Negative = None,
        character_weight: Weight = None,
        background_weight: Weight = None,
        style_weight: Weight = None,
        num_candidates: Candidates = 1,
        filter_consistency: Filter = True,
        run_as_job: AsJob = False,
    ) -> Annotated[CallToolResult, GenerationResult]:
        """Generate an image of a known character in a scene with its LoRA (plus optional background
        and style LoRAs), its preset prompt and trigger words. Returns image ids (best first), an inline
        preview, the exact prompt, LoRAs with weights, seed and timings. With num_candidates > 1 the
        candidates are scored against the character's reference faces and ordered best first.
        Calls estimated to exceed the client time limit return a job_id: poll get_job."""
        plan = studio.plan_character(
            character=character, scene_description=scene_description, background=background,
            style=style, quality=quality, seed=seed, width=width, height=height, steps=steps, cfg_scale=cfg_scale,
            negative_prompt=negative_prompt, character_weight=character_weight,
            background_weight=background_weight, style_weight=style_weight, num_candidates=num_candidates,
            filter_consistency=filter_consistency,
        )
        return await run_generation(plan, ctx, run_as_job)

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False, openWorldHint=False))
    @tool_errors
    async def generate_with_control(
        ctx: Context,
        prompt: Annotated[str, Field(description="what to draw (with a character: the scene)")] = "",
        character: OptCharacter = None,
        pose_image: ImageRef = None,
        pose_preset: Annotated[str | None, Field(description="named pose instead of pose_image: see pose_presets in list_characters (standing, waving, running, sitting, jumping, ...)")] = None,
        pose_strength: Strength = None,
        depth_image: ImageRef = None,
        depth_strength: Strength = None,
        canny_image: ImageRef = None,
        canny_strength: Strength = None,
        control_start: Annotated[float, NotBool, Field(description="fraction of steps where control starts, 0-1")] = 0.0,
        control_end: Annotated[float, NotBool, Field(description="fraction of steps where control ends, 0-1, > control_start")] = 1.0,
        preprocess: Annotated[bool, Field(description="true: extract pose/depth/edges from ordinary photos; false: the images already are control maps")] = True,
        background: Background = None,
        style: Style = None,
        quality: Quality = None,
        seed: Seed = None,
        width: Size = None,
        height: Size = None,
        steps: Steps = None,
        cfg_scale: Cfg = None,
        negative_prompt: Negative = None,
        character_weight: Weight = None,
        background_weight: Weight = None,
        style_weight: Weight = None,
        num_candidates: Candidates = 1,
        filter_consistency: Filter = True,
        run_as_job: AsJob = False,
    ) -> Annotated[CallToolResult, GenerationResult]:
        """Generate with ControlNet guidance: a pose (from a photo or a named pose preset), a depth map
        and/or canny edges; any combination runs together. Images are ids or paths under the input folders.
        The control maps used are saved and returned (control_images) so you can see what steered the image.
        Takes the same character/LoRA/quality options as generate_character."""
        plan = studio.plan_control(
            prompt=prompt, character=character, pose_image=pose_image, pose_preset=pose_preset,
            pose_strength=pose_strength, depth_image=depth_image, depth_strength=depth_strength,
            canny_image=canny_image, canny_strength=canny_strength, control_start=control_start,
            control_end=control_end, preprocess=preprocess, background=background, style=style, quality=quality,
            seed=seed, width=width, height=height, steps=steps, cfg_scale=cfg_scale, negative_prompt=negative_prompt,
            character_weight=character_weight, background_weight=background_weight, style_weight=style_weight,
            num_candidates=num_candidates, filter_consistency=filter_consistency,
        )
        return await run_generation(plan, ctx, run_as_job)

    @server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
    @tool_errors
    async def score_consistency(
        images: Annotated[list[str], Field(description="image ids (img_...) or paths under the input folders to score")],
        character: OptCharacter = None,
        reference_images: Annotated[list[str] | None, Field(description="reference face images (ids or paths); default: the character's enrolled references")] = None,
        threshold: Annotated[float | None, NotBool, Field(description="match threshold 0-1 on the active face backend's scale; default per backend/character")] = None,
    ) -> dict[str, Any]:
        """Check that faces in images belong to the character: per image face_found, similarity (best and
        mean over the references), is_match against the threshold, and the face backend used. An image
        without a face is a normal result (face_found false). Needs a character with enrolled references
        (enroll_reference) or reference_images."""
        return await anyio.to_thread.run_sync(lambda: studio.score_images(images, character, reference_images, threshold))

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False, openWorldHint=False))
    @tool_errors
    async def enroll_reference(
        character: Character,
        images: Annotated[list[str], Field(description="image ids or paths under the input folders showing the character's face")],
    ) -> dict[str, Any]:
        """Add reference faces for a character (used by score_consistency and candidate filtering).
        Every image must show a detectable face; stored per face backend."""
        return await anyio.to_thread.run_sync(lambda: studio.enroll(character, images))

    @server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
    @tool_errors
    async def get_job(job_id: Annotated[str, Field(description="job id returned by a generation tool")]) -> Annotated[CallToolResult, JobInfo]:
        """Progress and, when done, the result of a background generation job. Job ids are kept for
        job_ttl_s (default 24 h) after they finish, by the server process that ran them: a job outlives
        the call (and, over HTTP, the client) that started it, but not a server restart (a stdio server
        ends with its client). Images of finished jobs stay in the store (list_images)."""
        job = studio.job(job_id)
        info = studio.job_info(job)
        if info.state == "done":
            return job_outcome(job, info)  # JobInfo JSON (with the result) + previews + links
        return shaping.data_result(info)

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=True, idempotentHint=True, openWorldHint=False))
    @tool_errors
    async def cancel_job(job_id: Annotated[str, Field(description="job id to stop")]) -> dict[str, Any]:
        """Stop a queued or running job within one denoising step. Nothing from it is kept (a batch is
        all-or-nothing). Returns the job's final state."""
        job = studio.job(job_id)
        job.cancel()
        await anyio.to_thread.run_sync(lambda: job.finished.wait(30))
        return studio.job_info(job).model_dump(mode="json", exclude_none=True)

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=True, openWorldHint=True))
    @tool_errors
    async def release_gpu(
        mode: Annotated[Literal["offload", "unload"], Field(description="offload: weights to CPU RAM (fast to re-acquire); unload: free RAM too")] = "offload",
        wake_llm: Annotated[bool, Field(description="wake the local LLM server after releasing")] = True,
    ) -> dict[str, Any]:
        """Give the GPU back to the local LLM server: the engine offloads or unloads, the lease is
        released and the LLM is woken. Safe to call any time, also twice; while a job generates, the
        release waits for the queue to run empty (the result says deferred). Returns VRAM before/after,
        time taken and the LLM state."""
        return await anyio.to_thread.run_sync(lambda: studio.release_gpu(mode, wake_llm))

    @server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=True))
    @tool_errors
    async def gpu_status() -> dict[str, Any]:
        """Who holds the GPU lease, VRAM used/free, engine state (loaded LoRAs/ControlNets), the LLM
        backend state, and the queue (limit, calls waiting, the job running now with its progress)."""
        return await anyio.to_thread.run_sync(studio.gpu_status)

    @server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
    @tool_errors
    async def list_images(limit: Annotated[int, NotBool, Field(description="how many, newest first (1-200)")] = 20) -> dict[str, Any]:
        """Recent images in the store with their ids, kinds and prompts."""
        return studio.list_images(limit)

    # ------------------------------------------------------------------ resources
    @server.resource("sdxl://images/{image_id}", mime_type="image/png",
                     description="a generated image, the PNG file (2-3 MB at 1024x1024; /jpeg fits 1 MiB clients)")
    @resource_errors
    def image_resource(image_id: str) -> bytes:
        return studio.image_file(image_id).read_bytes()

    @server.resource("sdxl://images/{image_id}/jpeg", mime_type="image/jpeg",
                     description="a generated image as a JPEG that fits in one client message (under 1 MiB as base64)")
    @resource_errors
    def image_jpeg(image_id: str) -> bytes:
        from PIL import Image

        from mcp_sdxl.store import encode_jpeg

        with Image.open(studio.image_file(image_id)) as img:
            return encode_jpeg(img, limits.max_result_bytes * 3 // 4 - 1_000)  # base64 grows data by 4/3

    @server.resource("sdxl://images/{image_id}/metadata", mime_type="application/json", description="generation parameters of an image")
    @resource_errors
    def image_metadata(image_id: str) -> str:
        return json.dumps(studio.image_metadata(image_id), indent=1, default=str)

    @server.resource("sdxl://characters", mime_type="application/json", description="characters, backgrounds, styles, pose presets")
    def characters_resource() -> str:
        return json.dumps(studio.list_characters(), indent=1)

    @server.resource("sdxl://gpu", mime_type="application/json", description="GPU lease, VRAM and engine state")
    def gpu_resource() -> str:
        return json.dumps(studio.gpu_status(), indent=1, default=str)

    add_edit_tools(server, studio, run_generation)
    _register_prompts(server)
    _flatten_schemas(server)
    return server


async def wait_for_job(job, ctx: Context, budget_s: float) -> bool:
    """Forward the job's progress as MCP notifications; cancel the job if the call is cancelled.
    Returns False when the budget ran out first (the job keeps running)."""
    sent = 0
    try:
        with anyio.move_on_after(budget_s):
            while True:
                done = job.finished.is_set()
                events = job.events[sent:]
                for event in events:
                    await ctx.report_progress(event.done, event.total, event.message)
                sent += len(events)
                if done:
                    return True
                await anyio.sleep(0.02)
        return False
    except anyio.get_cancelled_exc_class():
        job.cancel()
        raise


def _register_prompts(server: MCPServer) -> None:
    """Each prompts/*.md is a template: front matter (name, description, arguments) + body with {args}."""
    from mcp.server.mcpserver.prompts.base import Prompt, PromptArgument

    for path in sorted(PROMPTS_DIR.glob("*.md")):
        front, body = _split_front_matter(path.read_text(encoding="utf-8"))
        arguments = [
            PromptArgument(name=a["name"], description=a.get("description"), required=a.get("required", False))
            for a in front.get("arguments", [])
        ]
        names = [a.name for a in arguments]

        def render(body=body, names=names, **kwargs) -> str:
            values = {n: kwargs.get(n) or "none given" for n in names}
            return body.format(**values)

        server.add_prompt(Prompt(
            name=front.get("name", path.stem), description=front.get("description", ""), arguments=arguments,
            fn=lambda render=render, **kw: render(**kw),
        ))


def _split_front_matter(text: str) -> tuple[dict, str]:
    import yaml

    if text.startswith("---\n"):
        head, _, body = text[4:].partition("\n---\n")
        return yaml.safe_load(head) or {}, body.strip() + "\n"
    return {}, text


def _flatten_schemas(server: MCPServer) -> None:
    for tool in server._tool_manager.list_tools():
        # Clients paste descriptions into the LLM's prompt verbatim: no source indentation.
        tool.description = inspect.cleandoc(tool.description or "")
        tool.parameters = shaping.inline_refs(tool.parameters)
        if tool.output_schema is not None:
            tool.__dict__["output_schema"] = shaping.inline_refs(tool.output_schema)
