"""Hostile inputs and confined file access: what a model (or an attacker behind one) may send.

A hypothesis property test calls every tool with arguments drawn from its own input schema mixed with
wrong types, out-of-range and huge numbers, NaN/inf, 0 and 10,000 steps, odd sizes, long and unicode
strings, missing and extra fields. Every call must come back as a result or a tool error that says
something, the server must keep answering, and nothing may be written outside its folders.
Explore further with HOSTILE_EXAMPLES=600 (random instead of the fixed 90) and HOSTILE_LOG=1 (print calls).
"""

from __future__ import annotations

import math
import os

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp_procs import REPO, configure, small, snapshot, text_of

from mcp_sdxl.server import build_server

NUMBERS = [0, -1, 1, 2, 3, 7, 8, 9, 31, 64, 65, 96, 128, 129, 10_000, 2**31, 2**63, -(2**63), 10**30,
           0.5, 1.5, -0.0, 1e308, math.nan, math.inf, -math.inf, 64.0, 63.9]
STRINGS = ["", " ", "luca", "alberto", "nemo", "portorosso", "none", "draft", "high", "ultra", "waving",
           "standing", "moonwalk", "offload", "explode", "a" * 10_000, "💥🎨 ñandú 中文 \u202eevil", "\x00nul",
           "../../etc/passwd", "/etc/passwd", "~/.ssh/id_rsa", "inputs/../../x.png", "\ud800", "img_1",
           "img_20200101-000000_00000000", "img_20200101-000000_00000000\n", "sdxl://images/../../etc/passwd",
           "job_000000000000", "job_\u0000", "(word)1.3, word++", "{x}{y}%s%n"]
HOSTILE = st.one_of(
    st.sampled_from(NUMBERS), st.sampled_from(STRINGS), st.booleans(), st.none(),
    st.lists(st.sampled_from(STRINGS + [1, None]), max_size=3),
    st.just(["img_20200101-000000_00000000"] * 40), st.just({"nested": {"x": 1}}),
    st.integers(), st.floats(), st.text(max_size=30),
)


def _value_for(prop: dict):
    """A value of roughly the right type, or a hostile one."""
    types = {prop.get("type")} | {a.get("type") for a in prop.get("anyOf", [])}
    sane = []
    if "integer" in types:
        sane.append(st.sampled_from([1, 2, 3, 64, 128, 0, 10_000, 96]))
    if "number" in types:
        sane.append(st.sampled_from([0.0, 0.5, 1.0, 7.0, 2.5, math.nan, math.inf, 31.0]))
    if "string" in types:
        enum = prop.get("enum") or [e for a in prop.get("anyOf", []) for e in a.get("enum", [])]
        sane.append(st.sampled_from(enum or STRINGS[:14]))
    if "boolean" in types:
        sane.append(st.booleans())
    if "array" in types:
        sane.append(st.lists(st.sampled_from(STRINGS[16:27]), max_size=2))
    return st.one_of(*sane, HOSTILE) if sane else HOSTILE


def valid_calls(image_id: str, job_id: str) -> dict[str, dict]:
    """A working call per tool: the starting point that mutations break one or two fields of."""
    return {
        "list_characters": {},
        "gpu_status": {},
        "list_images": {"limit": 5},
        "release_gpu": {"mode": "offload"},
        "get_job": {"job_id": job_id},
        "cancel_job": {"job_id": job_id},
        "generate_character": small(),
        "generate_with_control": {"prompt": "a robot", "pose_preset": "waving", "width": 64, "height": 64,
                                  "steps": 2},
        "score_consistency": {"images": [image_id], "reference_images": [image_id]},
        "enroll_reference": {"character": "luca", "images": [image_id]},
        "edit_image": {"image": image_id, "prompt": "a robot", "strength": 0.5, "steps": 2},
        "upscale_image": {"image": image_id, "factor": 2, "quality": "draft"},
        "regenerate": {"image_id": image_id, "steps": 2},
    }


@st.composite
def calls(draw, tools: dict, valid: dict):
    name = draw(st.sampled_from(sorted(tools)))
    schema = tools[name]
    properties = schema.get("properties", {})
    if draw(st.booleans()):
        # a working call with one to three fields broken, dropped or added
        args = dict(valid[name])
        for _ in range(draw(st.integers(1, 3))):
            key = draw(st.sampled_from(sorted(properties) + ["<extra>", "<drop>"]))
            if key == "<drop>" and args:
                args.pop(draw(st.sampled_from(sorted(args))))
            elif key == "<extra>":
                args[draw(st.sampled_from(["extra", "__proto__", "a" * 300, "steps ", ""]))] = draw(HOSTILE)
            elif key in properties:
                args[key] = draw(_value_for(properties[key]))
    else:
        # anything at all, shaped by the schema
        args = {}
        for key, prop in properties.items():
            required = key in schema.get("required", [])
            if draw(st.integers(0, 9)) < (9 if required else 4):
                args[key] = draw(_value_for(prop))
    if name == "release_gpu" and args.get("mode") == "unload":
        args["mode"] = "offload"  # unloading is valid but makes every later generation reload (slow)
    return name, args


@pytest.fixture
def hostile_studio(config_dir, home):
    from mcp_sdxl.config import load_settings
    from mcp_sdxl.studio import Studio

    # Small limits: whatever hypothesis finds valid is a tiny, fast generation.
    configure(config_dir, limits={"max_steps": 3, "max_candidates": 2, "max_pixels": 128 * 128},
              server={"queue_limit": 4})
    studio = Studio(load_settings(config_dir, home=home, profile="tiny"))
    yield studio
    studio.close()


def _allowed(studio):
    settings = studio.settings
    return (settings.output_dir, studio.lease.files.dir, settings.home / "references",
            settings.home / "tiny")


def test_every_tool_survives_hostile_arguments(hostile_studio, tmp_path):
    studio = hostile_studio
    server = build_server(studio)
    tools: dict = {}

    primed: dict = {}

    async def list_tools():
        async with Client(server) as client:
            for tool in (await client.list_tools()).tools:
                tools[tool.name] = tool.input_schema
            # prime: the engine loads once, outside the examples; an image and a job id to start from
            made = await client.call_tool("generate_character", small(run_as_job=True))
            primed["job_id"] = made.structured_content["job_id"]
            for _ in range(600):
                info = (await client.call_tool("get_job", {"job_id": primed["job_id"]})).structured_content
                if info["state"] == "done":
                    break
                await anyio.sleep(0.05)
            primed["image_id"] = info["result"]["images"][0]["id"]

    anyio.run(list_tools)
    valid = valid_calls(primed["image_id"], primed["job_id"])
    assert len(tools) >= 10
    allowed = _allowed(studio)
    before = snapshot(tmp_path, skip=allowed)
    repo_before = sorted(os.listdir(REPO))
    outcomes = {"ok": 0, "error": 0}

    @settings(max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "90")), deadline=None, derandomize=not os.environ.get("HOSTILE_EXAMPLES"), database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(call=calls(tools, valid))
    def check(call):
        name, args = call

        async def one():
            async with Client(server) as client:
                with anyio.fail_after(60):
                    return await client.call_tool(name, args)

        result = anyio.run(one)
        text = text_of(result)
        if os.environ.get("HOSTILE_LOG"):
            print("CALL", name, repr(args)[:200], "->", result.is_error, text[:300].replace("\n", " "))
        if result.is_error:
            outcomes["error"] += 1
            assert text.strip(), (name, args)
            assert text.strip() != f"Error executing tool {name}", (name, args, text)  # a crash, not a message
            assert "Traceback" not in text
        else:
            outcomes["ok"] += 1

    check()
    print(f"\nhostile calls: {outcomes['ok']} results, {outcomes['error']} clear tool errors")

    async def still_up():
        async with Client(server) as client:
            listed = await client.call_tool("list_characters", {})
            assert not listed.is_error and listed.structured_content["profile"] == "tiny"
            ok = await client.call_tool("generate_character", small())
            assert not ok.is_error, text_of(ok)

    anyio.run(still_up)
    after = snapshot(tmp_path, skip=allowed)
    assert after == before, sorted(set(after) ^ set(before))
    assert sorted(os.listdir(REPO)) == repo_before


# ---------------------------------------------------------------------------- confined file access
@pytest.mark.anyio
async def test_paths_and_ids_are_confined(hostile_studio, tmp_path):
    from PIL import Image

    studio = hostile_studio
    inputs = studio.store.input_dirs[0]
    secret = tmp_path / "secret.png"
    Image.new("RGB", (64, 64), "red").save(secret)
    Image.new("RGB", (64, 64), "blue").save(inputs / "pose.png")
    (inputs / "escape.png").symlink_to(secret)
    (inputs / "sub").mkdir()
    (inputs / "sub" / "up.png").symlink_to("../../../secret.png")
    (inputs / "loop.png").symlink_to(inputs / "loop.png")
    (inputs / "notes.txt").write_text("not an image")
    server = build_server(studio)
    refused = [str(secret), "../secret.png", "../../secret.png", "escape.png", "sub/up.png", "loop.png",
               "/etc/passwd", "../../../../../../etc/passwd", "~/secret.png", f"{inputs}/../../secret.png",
               "sdxl://images/../../secret.png", "x" * 5000, "pose.png\x00.txt", "notes.txt",
               "img_20200101-000000_00000000\n", "img_20200101-000000_zzzzzzzz"]
    async with Client(server) as client:
        for ref in refused:
            for tool, args in (("score_consistency", {"images": [ref], "character": "luca"}),
                               ("generate_with_control", {"prompt": "x", "canny_image": ref, "width": 64,
                                                          "height": 64, "steps": 1})):
                result = await client.call_tool(tool, args)
                assert result.is_error, (tool, ref)
                text = text_of(result)
                assert any(s in text for s in ("allowed folders", "not an image", "too long", "no image with id")), (ref, text)
        # inside the input folder, by relative or absolute path: accepted
        for ref in ("pose.png", str(inputs / "pose.png"), "./sub/../pose.png"):
            result = await client.call_tool("generate_with_control", {
                "prompt": "x", "canny_image": ref, "width": 64, "height": 64, "steps": 1})
            assert not result.is_error, (ref, text_of(result))
        for bad in ("../x", "img_1", "", "job_x" * 100):
            result = await client.call_tool("get_job", {"job_id": bad})
            assert result.is_error and "no job" in text_of(result)
    assert secret.read_bytes()  # untouched
