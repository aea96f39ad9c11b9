"""The MCP surface through the SDK's real client, in memory: schemas, results, resources, errors."""

from __future__ import annotations

import base64
import io
import json

import pytest
from mcp import Client
from PIL import Image

from mcp_sdxl.server import build_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def server(studio):
    return build_server(studio)


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


async def test_tools_are_flat_and_documented(server):
    async with Client(server) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert {"list_characters", "generate_character", "generate_with_control", "score_consistency",
            "release_gpu", "gpu_status", "get_job", "cancel_job", "enroll_reference"} <= set(tools)
    for tool in tools.values():
        assert len(tool.description) > 60, tool.name
        schema = tool.input_schema
        assert not any("$ref" in n or "$defs" in n for n in _walk(schema)), tool.name
        for name, prop in schema.get("properties", {}).items():
            assert prop.get("description"), f"{tool.name}.{name} has no description"
            types = [prop.get("type")] + [a.get("type") for a in prop.get("anyOf", [])]
            assert not {"object"} & set(types), f"{tool.name}.{name} is nested"
        if tool.output_schema:
            assert not any("$ref" in n for n in _walk(tool.output_schema)), tool.name


async def test_list_characters(server):
    async with Client(server) as client:
        result = await client.call_tool("list_characters", {})
    assert not result.is_error
    data = json.loads(result.content[0].text)
    assert {c["name"] for c in data["characters"]} == {"luca", "alberto"}
    assert data["profile"] == "tiny"
    assert "standing" in data["pose_presets"]
    assert result.structured_content["backgrounds"][0]["name"] == "portorosso"


async def test_generate_character_result_shape(server):
    async with Client(server) as client:
        result = await client.call_tool(
            "generate_character", {"character": "luca", "scene_description": "waving at the camera", "seed": 3}
        )
        assert not result.is_error, result.content[0].text
        data = json.loads(result.content[0].text)
        assert data == result.structured_content  # the same JSON both ways
        image = data["images"][0]
        assert image["id"].startswith("img_") and data["profile"] == "tiny" and data["steps"] > 0
        assert "luca" in data["prompt"] and data["loras"][0]["name"] == "luca"
        previews = [c for c in result.content if c.type == "image"]
        assert previews and previews[0].mime_type in ("image/webp", "image/jpeg")
        preview = Image.open(io.BytesIO(base64.b64decode(previews[0].data)))
        assert max(preview.size) <= 768
        links = [c for c in result.content if c.type == "resource_link"]
        assert links[0].uri == f"sdxl://images/{image['id']}"
        resource = await client.read_resource(links[0].uri)
        png = base64.b64decode(resource.contents[0].blob)
        with Image.open(io.BytesIO(png)) as img:
            assert img.format == "PNG" and img.size == (image["width"], image["height"])
            assert "waving at the camera" in img.text["parameters"]
        meta = await client.read_resource(f"sdxl://images/{image['id']}/metadata")
        assert json.loads(meta.contents[0].text)["seed"] == 3
    total = sum(len(c.model_dump_json()) for c in result.content) + len(json.dumps(result.structured_content))
    assert total < 1_048_576


async def test_bad_inputs_are_clear_tool_errors(server):
    cases = [
        ("generate_character", {"character": "nemo", "scene_description": "x"}, "valid characters: alberto, luca"),
        ("generate_character", {"character": "luca", "scene_description": "x", "background": "mars"}, "portorosso"),
        ("generate_character", {"character": "luca", "scene_description": "x", "width": 100000}, "width must be"),
        ("generate_character", {"character": "luca", "scene_description": "x", "width": 100}, "multiple of 32"),
        ("generate_character", {"character": "luca", "scene_description": "x", "character_weight": 1.5}, "character_weight"),
        ("generate_character", {"character": "luca", "scene_description": "x", "quality": "ultra"}, "draft"),
        ("generate_character", {"character": "luca", "scene_description": "x", "steps": 10000}, "steps"),
        ("generate_with_control", {"prompt": "x", "pose_image": "/etc/passwd"}, "allowed folders"),
        ("generate_with_control", {"prompt": "x", "pose_image": "../../etc/hosts"}, "allowed folders"),
        ("generate_with_control", {"prompt": "x"}, "at least one control"),
        ("generate_with_control", {"prompt": "x", "pose_preset": "moonwalk"}, "standing"),
        ("generate_with_control", {"prompt": "x", "pose_preset": "waving", "control_start": 0.8, "control_end": 0.2}, "control_start"),
        ("generate_with_control", {"prompt": "x", "pose_preset": "waving", "pose_strength": 3}, "pose_strength"),
        ("score_consistency", {"images": ["img_20260101-000000_deadbeef"]}, "no image with id"),
        ("get_job", {"job_id": "job_nope"}, "no job"),
        ("release_gpu", {"mode": "explode"}, "mode"),
        # arguments a tool does not take are named, with the real one (pydantic alone drops them silently)
        ("generate_character", {"character": "luca", "prompt": "x"}, "unknown argument(s) 'prompt' (did you mean "
                                                                     "'scene_description'?); this tool takes: character,"),
        ("generate_character", {"character": "luca", "scene_description": "x", "num_inference_steps": 5},
         "'num_inference_steps' (did you mean 'steps'?)"),
        ("generate_character", {"character": "luca", "scene_description": "x", "sead": 5}, "'sead' (did you mean 'seed'?)"),
        ("list_images", {"limit": 5, "extra_field": 1}, "unknown argument(s) 'extra_field'; this tool takes: limit"),
        ("generate_character", {"character": "", "scene_description": "x"}, "give a character: one of alberto, luca"),
    ]
    async with Client(server) as client:
        for name, args, expected in cases:
            result = await client.call_tool(name, args)
            assert result.is_error, (name, args)
            assert expected in result.content[0].text, (name, args, result.content[0].text)
        ok = await client.call_tool("list_characters", {})
        assert not ok.is_error


async def test_wrong_types_are_rejected(server):
    async with Client(server) as client:
        result = await client.call_tool("generate_character", {"character": 5, "scene_description": ["x"]})
        assert result.is_error
        result = await client.call_tool("generate_character", {"character": "luca"})
        assert result.is_error and "scene_description" in result.content[0].text
        # one short clause per field with what was sent, no pydantic links
        result = await client.call_tool("generate_character", {"character": "luca", "scene_description": "x",
                                                               "width": "big"})
        text = result.content[0].text
        assert result.is_error and "invalid arguments: width: Input should be a valid integer" in text
        assert "(got 'big')" in text and "pydantic.dev" not in text and "\n" not in text
        result = await client.call_tool("release_gpu", {"mode": "nap"})
        assert result.content[0].text == ("Error executing tool release_gpu: invalid arguments: "
                                          "mode: Input should be 'offload' or 'unload' (got 'nap')")
        ok = await client.call_tool("list_images", {"limit": "5"})  # a number sent as a string still works
        assert not ok.is_error
        result = await client.call_tool("list_images", {"limit": True})  # not read as 1
        assert result.is_error and "must be a number, not true/false" in result.content[0].text


async def test_errors_about_many_bad_items_stay_short(server):
    """One clause per problem made a 5.4 MB message for 100,000 bad list items (2.1 MB for 50,000 unknown
    argument names): the first ten are named, then how many more."""
    async with Client(server) as client:
        result = await client.call_tool("score_consistency", {"character": "luca", "images": [1] * 100_000})
        text = result.content[0].text
        assert result.is_error and "images.0:" in text and "and 99990 more" in text and len(text) < 4000
        args = {f"extra_{i}": 1 for i in range(50_000)}
        result = await client.call_tool("list_images", args)
        text = result.content[0].text
        assert result.is_error and "'extra_0'" in text and "and 49990 more" in text and len(text) < 4000
        assert "this tool takes: limit" in text


async def test_prompt_template(server):
    async with Client(server) as client:
        prompts = await client.list_prompts()
        assert "plan_character_scene" in [p.name for p in prompts.prompts]
        rendered = await client.get_prompt("plan_character_scene", {"character": "luca", "scene": "on a vespa"})
    text = rendered.messages[0].content.text
    assert "luca" in text and "on a vespa" in text and "list_characters" in text


@pytest.mark.parametrize(("name", "arguments", "expected"), [
    ("plan_character_scene", {"character": "luca"}, "needs 'scene'; arguments: character (required), scene (required)"),
    ("plan_character_scene", {"character": "luca", "scene": ""}, "needs 'scene'"),
    ("nope", {}, "unknown prompt 'nope'; prompts: plan_character_scene"),
    ("plan_character_scene", {"character": "x" * 100_000, "scene": "pier"}, "'character' longer than 2000 characters"),
])
async def test_prompt_errors_say_what_would_work(server, name, arguments, expected):
    """The SDK alone answers these with "Internal server error"."""
    from mcp.shared.exceptions import MCPError
    from mcp.types import INVALID_PARAMS

    async with Client(server) as client:
        with pytest.raises(MCPError) as err:
            await client.get_prompt(name, arguments)
        assert err.value.code == INVALID_PARAMS and expected in err.value.message
        assert not (await client.call_tool("list_characters", {})).is_error  # still serving


async def test_release_gpu_twice_and_status(server):
    async with Client(server) as client:
        await client.call_tool("generate_character", {"character": "alberto", "scene_description": "x", "seed": 1})
        first = await client.call_tool("release_gpu", {})
        second = await client.call_tool("release_gpu", {})
        status = await client.call_tool("gpu_status", {})
    assert not first.is_error and not second.is_error
    assert first.structured_content["lease"]["released"] is True
    assert second.structured_content["lease"]["released"] is False
    assert status.structured_content["lease"]["state"] == "free"
    assert status.structured_content["engine"]["profile"] == "tiny"


async def test_arguments_without_effect_are_said_and_an_empty_character_means_none(server):
    async with Client(server) as client:
        result = await client.call_tool("generate_character", {"character": "luca", "scene_description": "x",
                                                               "style": "none", "style_weight": 0.5, "seed": 1})
        notes = result.structured_content["notes"]
        assert not result.is_error and len(notes) == 1
        assert notes[0].startswith("style_weight 0.5 had no effect: no style LoRA is used")
        result = await client.call_tool("generate_with_control", {"prompt": "waving", "pose_preset": "waving",
                                                                  "character": "", "character_weight": 0.5,
                                                                  "seed": 1})
        assert not result.is_error and result.structured_content["character"] is None
        assert result.structured_content["notes"][0].startswith("character_weight 0.5 had no effect")
