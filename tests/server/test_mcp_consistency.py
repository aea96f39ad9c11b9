"""Face consistency through MCP: enroll_reference, score_consistency, and candidate ranking in generation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from mcp import Client
from PIL import Image, ImageOps

from mcp_sdxl.server import build_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


@pytest.fixture
def photos(studio):
    """Real photos in the input folder: one person twice (flipped, rescaled) and another person."""
    inputs = studio.store.input_dirs[0]
    with Image.open(_package_file("skimage", "data", "astronaut.png")) as img:
        astronaut = img.convert("RGB")
    astronaut.save(inputs / "astronaut.png")
    ImageOps.mirror(astronaut).resize((384, 384)).save(inputs / "astronaut_flipped.jpg", quality=80)
    with Image.open(_package_file("insightface", "data", "images", "Tom_Hanks_54745.png")) as img:
        img.convert("RGB").resize((224, 224)).save(inputs / "other_person.png")
    Image.linear_gradient("L").convert("RGB").save(inputs / "no_face.png")
    return inputs


async def test_score_separates_two_people(studio, photos):
    async with Client(build_server(studio)) as client:
        result = await client.call_tool("score_consistency", {
            "images": ["astronaut_flipped.jpg", "other_person.png", "no_face.png"],
            "reference_images": ["astronaut.png"]})
    assert not result.is_error, result.content[0].text
    data = json.loads(result.content[0].text)
    same, other, none = data["results"]
    assert data["backend"] == "sface" and data["threshold"] == pytest.approx(0.363)
    assert same["face_found"] and same["is_match"] and same["similarity_best"] > 0.8
    assert other["face_found"] and not other["is_match"] and other["similarity_best"] < 0.3
    assert none["face_found"] is False and none["is_match"] is False
    assert "1 of 3" in data["summary"]


async def test_enroll_then_score_by_character(studio, photos):
    async with Client(build_server(studio)) as client:
        missing = await client.call_tool("score_consistency", {"images": ["astronaut.png"], "character": "luca"})
        assert missing.is_error and "enroll" in missing.content[0].text.lower()
        faceless = await client.call_tool("enroll_reference", {"character": "luca", "images": ["no_face.png"]})
        assert faceless.is_error and "no detectable face" in faceless.content[0].text
        enrolled = await client.call_tool("enroll_reference", {"character": "luca", "images": ["astronaut.png"]})
        assert not enrolled.is_error and enrolled.structured_content["total_references"] == 1
        scored = await client.call_tool("score_consistency", {
            "images": ["astronaut_flipped.jpg", "other_person.png"], "character": "luca"})
        listing = await client.call_tool("list_characters", {})
    matches = [r["is_match"] for r in scored.structured_content["results"]]
    assert matches == [True, False]
    luca = next(c for c in listing.structured_content["characters"] if c["name"] == "luca")
    assert luca["reference_embeddings"] == 1


async def test_bad_consistency_inputs(studio, photos):
    async with Client(build_server(studio)) as client:
        for args, expected in [
            ({"images": ["astronaut.png"], "character": "nemo"}, "valid characters"),
            ({"images": ["astronaut.png"]}, "reference_images"),
            ({"images": ["astronaut.png"], "reference_images": ["astronaut.png"], "threshold": 1.5}, "threshold"),
            ({"images": ["missing.png"], "reference_images": ["astronaut.png"]}, "allowed folders"),
            ({"images": []}, "at least one"),
        ]:
            result = await client.call_tool("score_consistency", args)
            assert result.is_error and expected in result.content[0].text, (args, result.content[0].text)


def test_candidates_are_ranked_best_first(studio, photos):
    """The ranking step of generate_character, fed real photos as the 'generated' candidates."""
    studio.enroll("luca", ["astronaut.png"])
    plan = studio.planner.plan(kind="character", character="luca", scene_description="x", num_candidates=3)
    stored = [studio.store.save(Image.open(photos / name).convert("RGB"), {"seed": i})
              for i, name in enumerate(["other_person.png", "no_face.png", "astronaut_flipped.jpg"])]
    infos = [studio._info(s) for s in stored]
    ordered, summary = studio._rank_by_face(plan, stored, infos)
    assert [i.id for i in ordered] == [stored[2].id, stored[0].id, stored[1].id]
    assert [i.consistency.rank for i in ordered] == [1, 2, 3]
    assert [i.consistency.is_match for i in ordered] == [True, False, False]
    assert ordered[2].consistency.face_found is False
    assert summary.startswith("1 of 3 candidate(s) match luca")

    only_bad = [stored[0], stored[1]]
    ordered, summary = studio._rank_by_face(plan, only_bad, [studio._info(s) for s in only_bad])
    assert ordered[0].id == stored[0].id and "none passed, the closest is returned first" in summary


async def test_generation_reports_scores_for_every_candidate(studio, photos):
    studio.enroll("luca", ["astronaut.png"])
    async with Client(build_server(studio)) as client:
        result = await client.call_tool("generate_character", {
            "character": "luca", "scene_description": "portrait", "num_candidates": 3, "seed": 5,
            "width": 64, "height": 64, "steps": 2})
    data = result.structured_content
    assert len(data["images"]) == 3
    assert all(img["consistency"]["backend"] == "sface" for img in data["images"])
    assert "none passed" in data["consistency_summary"]  # random-weight images have no faces
