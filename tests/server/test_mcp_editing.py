"""edit_image, upscale_image and regenerate (issue 21) through the SDK's client on the tiny engine.

Behaviour, measured on pixels: strength 0 returns the source, inpainting keeps every pixel outside the
mask, an upscale has twice the sides, regenerate without overrides makes the same image and with an
override a different one; bad inputs are tool errors that leave nothing in the store.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from mcp import Client
from PIL import Image

from mcp_sdxl.server import build_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def server(studio):
    return build_server(studio)


def data(result) -> dict:
    assert not result.is_error, result.content[0].text
    return json.loads(result.content[0].text)


def pixels(studio, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(studio.store.get(image_id).path).convert("RGB"), dtype=np.float32)


async def generate(client, **arguments) -> dict:
    arguments = {"character": "luca", "scene_description": "on the beach", "seed": 5, **arguments}
    return data(await client.call_tool("generate_character", arguments))


async def test_edit_strength_zero_is_the_source_and_strength_changes_it(server, studio):
    async with Client(server) as client:
        source = (await generate(client))["images"][0]["id"]
        kept = data(await client.call_tool("edit_image", {"image": source, "prompt": "at night", "strength": 0}))
        light = data(await client.call_tool("edit_image", {"image": source, "prompt": "at night", "strength": 0.3,
                                                           "seed": 1}))
        heavy = data(await client.call_tool("edit_image", {"image": source, "prompt": "at night", "strength": 0.9,
                                                           "seed": 1}))
    original = pixels(studio, source)
    assert np.array_equal(pixels(studio, kept["images"][0]["id"]), original)
    change_light = np.abs(pixels(studio, light["images"][0]["id"]) - original).mean()
    change_heavy = np.abs(pixels(studio, heavy["images"][0]["id"]) - original).mean()
    assert 0 < change_light < change_heavy, (change_light, change_heavy)
    assert light["source_image"] == source and light["strength"] == 0.3
    assert light["steps"] > 0 and "img2img" in light["message"]
    meta = studio.store.get(light["images"][0]["id"]).metadata
    assert meta["source_image"] == source and meta["kind"] == "edit"
    with Image.open(studio.store.get(light["images"][0]["id"]).path) as png:
        assert "Denoising strength: 0.3" in png.text["parameters"]


async def test_inpainting_keeps_every_pixel_outside_the_mask(server, studio, settings):
    async with Client(server) as client:
        source = (await generate(client))["images"][0]["id"]
        size = Image.open(studio.store.get(source).path).size
        mask = Image.new("L", size, 0)
        mask.paste(255, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
        mask_path = settings.input_dirs[0] / "mask.png"
        mask.save(mask_path)
        result = data(await client.call_tool("edit_image", {"image": source, "prompt": "a red ball", "mask": "mask.png",
                                                            "strength": 1.0, "seed": 2}))
    edited, original = pixels(studio, result["images"][0]["id"]), pixels(studio, source)
    inside = np.asarray(mask) > 127
    assert np.abs(edited - original)[~inside].max() == 0  # exactly the source's pixels
    assert np.abs(edited - original)[inside].mean() > 5  # the masked part was repainted
    assert result["mask_image"] == str(mask_path.resolve()) and "inpainted" in result["message"]


async def test_upscale_doubles_the_size_and_says_how(server, studio):
    async with Client(server) as client:
        source = (await generate(client))["images"][0]["id"]
        progress = []

        async def on_progress(done, total, message):
            progress.append((done, total))

        result = data(await client.call_tool("upscale_image", {"image": source, "factor": 2, "seed": 3},
                                             progress_callback=on_progress))
    width, height = Image.open(studio.store.get(source).path).size
    up = studio.store.get(result["images"][0]["id"])
    assert Image.open(up.path).size == (2 * width, 2 * height)
    assert (result["width"], result["height"]) == (2 * width, 2 * height) and result["upscale_factor"] == 2
    assert "tile(s)" in result["message"] and "img2img" in result["message"]
    assert progress and progress[-1][0] == progress[-1][1]  # every tile's steps were reported
    # the tiles stay close to the resized source (low strength), far from noise
    resized = np.asarray(Image.open(studio.store.get(source).path).convert("RGB").resize(
        (2 * width, 2 * height), Image.Resampling.LANCZOS), dtype=np.float32)
    assert np.abs(pixels(studio, up.id) - resized).mean() < 40
    async with Client(server) as client:  # an upscale is regenerated tile for tile
        again = data(await client.call_tool("regenerate", {"image_id": up.id}))
    assert np.array_equal(pixels(studio, again["images"][0]["id"]), pixels(studio, up.id))


async def test_regenerate_reproduces_and_overrides(server, studio):
    async with Client(server) as client:
        first = await generate(client, background="portorosso")
        image_id = first["images"][0]["id"]
        again = data(await client.call_tool("regenerate", {"image_id": image_id}))
        reseeded = data(await client.call_tool("regenerate", {"image_id": image_id, "seed": 99}))
        reweighted = data(await client.call_tool("regenerate", {"image_id": image_id, "background_weight": 0.0}))
        noop = data(await client.call_tool("regenerate", {"image_id": image_id, "pose_strength": 0.5}))
    original = pixels(studio, image_id)
    assert np.array_equal(pixels(studio, again["images"][0]["id"]), original)
    assert again["prompt"] == first["prompt"] and again["loras"] == first["loras"]
    assert again["regenerated_from"] == image_id
    assert reseeded["images"][0]["seed"] == 99
    assert np.abs(pixels(studio, reseeded["images"][0]["id"]) - original).mean() > 1
    assert [lo["weight"] for lo in reweighted["loras"] if lo["kind"] == "background"] == [0.0]
    assert not np.array_equal(pixels(studio, reweighted["images"][0]["id"]), original)
    assert any("pose_strength had no effect" in n for n in noop["notes"])


async def test_regenerate_a_control_result_and_an_edit(server, studio):
    async with Client(server) as client:
        controlled = data(await client.call_tool("generate_with_control", {
            "prompt": "a boy", "character": "luca", "pose_preset": "waving", "seed": 4}))
        image_id = controlled["images"][0]["id"]
        again = data(await client.call_tool("regenerate", {"image_id": image_id}))
        weaker = data(await client.call_tool("regenerate", {"image_id": image_id, "pose_strength": 0.0}))
        edited = data(await client.call_tool("edit_image", {"image": image_id, "prompt": "at dusk", "strength": 0.5,
                                                            "seed": 8}))
        edit_again = data(await client.call_tool("regenerate", {"image_id": edited["images"][0]["id"]}))
    assert np.array_equal(pixels(studio, again["images"][0]["id"]), pixels(studio, image_id))
    assert again["controls"][0]["source"] == controlled["controls"][0]["control_image_id"]  # the same map
    assert weaker["controls"][0]["strength"] == 0.0
    assert not np.array_equal(pixels(studio, weaker["images"][0]["id"]), pixels(studio, image_id))
    assert np.array_equal(pixels(studio, edit_again["images"][0]["id"]), pixels(studio, edited["images"][0]["id"]))


@pytest.mark.parametrize("tool, arguments, expected", [
    ("edit_image", {"image": "img_20260101-000000_deadbeef", "prompt": "x"}, "no image with id"),
    ("edit_image", {"image": "../../etc/passwd.png", "prompt": "x"}, "not an image id or a file under the allowed"),
    ("edit_image", {"image": "{source}", "prompt": "x", "strength": 1.5}, "strength must be in [0, 1]"),
    ("edit_image", {"image": "{source}", "prompt": "x", "strength": 0.01}, "runs no denoising step"),
    ("edit_image", {"image": "{source}", "prompt": "x", "mask": "small.png"}, "the mask is 32x32"),
    ("upscale_image", {"image": "{source}", "factor": 9}, "factor must be a whole number from 2 to 4"),
    ("upscale_image", {"image": "big.png", "factor": 4}, "over the limit"),
    ("regenerate", {"image_id": "img_20260101-000000_deadbeef"}, "no image with id"),
    ("regenerate", {"image_id": "{control}"}, "cannot be regenerated"),
    ("regenerate", {"image_id": "{source}", "strength": 2, "steps": 0}, "steps must be in"),
])
async def test_bad_inputs_are_tool_errors_and_leave_nothing(server, studio, settings, tool, arguments, expected):
    inputs = settings.input_dirs[0]
    Image.new("L", (32, 32), 255).save(inputs / "small.png")
    Image.new("RGB", (2048, 2048)).save(inputs / "big.png")
    async with Client(server) as client:
        controlled = data(await client.call_tool("generate_with_control", {
            "prompt": "a boy", "pose_preset": "waving", "seed": 4}))
        before = set(studio.store.list_ids(1000))
        filled = {k: v.format(source=controlled["images"][0]["id"], control=controlled["control_images"][0]["id"])
                  if isinstance(v, str) else v for k, v in arguments.items()}
        result = await client.call_tool(tool, filled)
        assert result.is_error
        assert expected in result.content[0].text, result.content[0].text
        assert set(studio.store.list_ids(1000)) == before
        # the server is still up
        assert not (await client.call_tool("list_images", {"limit": 1})).is_error


async def test_upscale_as_a_job_fits_the_result_budget_and_cancels(server, studio, settings):
    from mcp_procs import assert_store_consistent, poll_job, wire_size

    async with Client(server) as client:
        source = (await generate(client))["images"][0]["id"]
        queued = data(await client.call_tool("upscale_image", {"image": source, "factor": 4, "run_as_job": True}))
        assert queued["status"] == "queued" and queued["upscale_factor"] == 4
        info, result = await poll_job(client, queued["job_id"])
        assert info["state"] == "done" and info["progress"]["done"] == info["progress"]["total"]
        assert info["result"]["width"] == 4 * 128
        assert wire_size(result) <= settings.sdxl.server.max_result_bytes  # a 4x upscale's preview fits

        kept = set(assert_store_consistent(studio.store.output_dir))
        running = data(await client.call_tool("upscale_image", {"image": source, "factor": 4, "run_as_job": True}))
        info, _ = await poll_job(client, running["job_id"], until=("running",), every=0.25)
        while not (info.get("progress") or {}).get("done"):
            info, _ = await poll_job(client, running["job_id"], until=("running",), every=0.25)
        stopped = await client.call_tool("cancel_job", {"job_id": running["job_id"]})
        assert stopped.structured_content["state"] == "cancelled"
        assert set(assert_store_consistent(studio.store.output_dir)) == kept  # nothing of it was kept
