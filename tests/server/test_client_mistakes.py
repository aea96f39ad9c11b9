"""Mistakes a confused model makes, through a real MCP client (in memory): each comes back as one short
tool error that says what would work, before anything queues or takes the GPU."""

from __future__ import annotations

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp_procs import small, text_of

from mcp_sdxl.server import build_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def studio(config_dir, home):
    from mcp_sdxl.config import load_settings
    from mcp_sdxl.studio import Studio

    studio = Studio(load_settings(config_dir, home=home, profile="tiny"))
    yield studio
    studio.close()


async def test_huge_unknown_names_are_quoted_short(studio):
    async with Client(build_server(studio)) as client:
        for tool, args in (
            ("generate_character", small(character="😀" * 100_000, background="x" * 100_000,
                                         style="y" * 100_000, quality="z" * 100_000)),
            ("enroll_reference", {"character": "x" * 100_000, "images": ["a.png"]}),
            ("get_job", {"job_id": "j" * 100_000}),
        ):
            result = await client.call_tool(tool, args)
            text = text_of(result)
            assert result.is_error and len(text.encode()) < 2000, (tool, len(text))
        assert "valid characters: " in text_of(await client.call_tool("generate_character", small(character="x" * 9999)))


async def test_a_bad_control_image_is_refused_before_the_gpu_is_taken(studio):
    async with Client(build_server(studio)) as client:
        for run_as_job in (False, True):
            result = await client.call_tool("generate_with_control", {
                "prompt": "a robot", "pose_image": "/etc/passwd", "width": 64, "height": 64, "steps": 2,
                "run_as_job": run_as_job})
            assert result.is_error and "allowed folders" in text_of(result)  # an error now, not a job id
        status = studio.gpu_status()
        assert status["lease"]["state"] != "held_by_us" and status["engine"]["state"] != "ready"
        assert status["queue"]["running"] is None and not status["queue"].get("queued")


async def test_generate_with_control_names_every_problem_at_once(studio):
    async with Client(build_server(studio)) as client:
        result = await client.call_tool("generate_with_control", {
            "prompt": "a robot", "pose_preset": "moonwalk", "width": 100_000, "style": "anime",
            "depth_strength": 0.5})
        text = text_of(result)
        assert result.is_error and text.count(";") >= 3, text
        for part in ("4 problems", "pose_preset 'moonwalk'", "width", "style 'anime'", "depth_strength given without depth_image"):
            assert part in text, (part, text)


async def test_true_is_not_a_number(studio):
    async with Client(build_server(studio)) as client:
        for field in ("steps", "width", "seed", "cfg_scale", "character_weight", "num_candidates"):
            result = await client.call_tool("generate_character", small(**{field: True}))
            assert result.is_error and "true/false" in text_of(result), (field, text_of(result))
        assert not (await client.call_tool("generate_character", small(steps=2))).is_error


async def test_unknown_tools_and_prompt_arguments_say_what_exists(studio):
    async with Client(build_server(studio)) as client:
        result = await client.call_tool("generate_image", {"prompt": "x"})
        assert result.is_error and "generate_character" in text_of(result) and "generate_with_control" in text_of(result)
        with pytest.raises(Exception, match="takes no argument 'mood'.*character"):
            await client.get_prompt("plan_character_scene", {"character": "luca", "scene": "beach", "mood": "happy"})
        prompt = await client.get_prompt("plan_character_scene", {"character": "luca", "scene": "beach"})
        body = prompt.messages[0].content.text
        assert "Pose hint: none given" in body


async def test_a_full_size_image_reads_as_a_jpeg_under_the_message_limit(studio):
    import base64
    import io

    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)  # the worst case for JPEG
    stored = studio.store.save(Image.fromarray(noise), {"type": "test"})
    limit = studio.settings.sdxl.server.max_result_bytes
    async with Client(build_server(studio)) as client:
        png = (await client.read_resource(f"sdxl://images/{stored.id}")).contents[0]
        assert len(png.blob) > limit  # the file itself, as stored
        jpeg = (await client.read_resource(f"sdxl://images/{stored.id}/jpeg")).contents[0]
        assert jpeg.mime_type == "image/jpeg" and len(jpeg.blob) < limit
        with Image.open(io.BytesIO(base64.b64decode(jpeg.blob))) as img:
            assert img.format == "JPEG" and max(img.size) >= 256


async def test_an_unknown_resource_names_the_ones_that_exist(studio):
    async with Client(build_server(studio)) as client:
        with pytest.raises(MCPError) as info:
            await client.read_resource("sdxl://nothing/" + "x" * 100_000)
        message = str(info.value)
        assert len(str(info.value.error.data)) < 300
        assert len(message) < 2000 and "sdxl://characters" in message and "sdxl://images/{image_id}/jpeg" in message
        for uri in ("sdxl://images/" + "x" * 100_000, "sdxl://images/" + "x" * 100 + "/metadata"):
            with pytest.raises(MCPError) as info:
                await client.read_resource(uri)
            error = info.value.error
            assert len(error.message) < 2000 and len(str(error.data)) < 300, uri
