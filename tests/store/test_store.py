"""Image store: atomic writes, embedded parameters, confined input paths."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from mcp_sdxl.errors import NotFoundError, UserInputError
from mcp_sdxl.store import ImageStore, encode_preview


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path / "out", [tmp_path / "in"])


def _image(color=(200, 30, 30), size=(64, 48)):
    return Image.new("RGB", size, color)


def test_save_embeds_parameters_and_sidecar(store):
    meta = {"prompt": "luca, boy", "negative_prompt": "blurry", "seed": 7, "steps": 30, "cfg_scale": 7.5,
            "scheduler": "DPMSolverMultistepScheduler", "width": 64, "height": 48,
            "loras": [{"name": "luca", "weight": 0.8}]}
    stored = store.save(_image(), meta)
    with Image.open(stored.path) as img:
        params = img.text["parameters"]
        embedded = json.loads(img.text["mcp_sdxl"])
    assert params.splitlines()[0] == "luca, boy"
    assert "Negative prompt: blurry" in params and "Seed: 7" in params and "Size: 64x48" in params
    assert "Lora weights: luca: 0.8" in params
    assert embedded["seed"] == 7 and embedded["id"] == stored.id
    assert json.loads(stored.path.with_suffix(".json").read_text())["prompt"] == "luca, boy"
    assert store.get(stored.id).metadata["steps"] == 30
    assert store.list_ids() == [stored.id]


def test_interrupted_write_leaves_nothing_visible(store, monkeypatch):
    real_replace = os.replace

    def crash_on_png(src, dst):
        if str(dst).endswith(".png"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_png)
    with pytest.raises(UserInputError, match="cannot write to the output folder"):
        store.save(_image(), {"prompt": "x"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert list(store.output_dir.iterdir()) == []


def test_leftovers_from_a_crash_are_swept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".img_20260101-000000_deadbeef.png.abc.tmp").write_bytes(b"half")
    (out / "img_20260101-000000_deadbeef.json").write_text("{}")
    store = ImageStore(out, [])
    assert list(store.output_dir.iterdir()) == []


def test_inputs_are_confined(store, tmp_path):
    _image().save(store.input_dirs[0] / "pose.png")
    assert store.resolve_input("pose.png") == (store.input_dirs[0] / "pose.png").resolve()
    outside = tmp_path / "secret.png"
    _image().save(outside)
    for ref in [str(outside), "../secret.png", "../../etc/passwd", "/etc/passwd"]:
        with pytest.raises(UserInputError, match="allowed folders"):
            store.resolve_input(ref)
    (store.input_dirs[0] / "link.png").symlink_to(outside)
    with pytest.raises(UserInputError, match="allowed folders"):
        store.resolve_input("link.png")


def test_ids_are_validated(store):
    with pytest.raises(UserInputError, match="not an image id"):
        store.get("../../x")
    with pytest.raises(NotFoundError, match="no image with id"):
        store.get("img_20260101-000000_deadbeef")
    stored = store.save(_image(), {})
    assert store.resolve_input(stored.id) == stored.path
    assert store.resolve_input(stored.uri) == stored.path


def test_unreadable_input_image(store):
    (store.input_dirs[0] / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserInputError, match="not a readable image"):
        store.open_image("broken.png")


def test_preview_respects_size_and_bytes():
    noisy = Image.effect_noise((1024, 1024), 80).convert("RGB")
    data, mime = encode_preview(noisy, 768, 60_000)
    assert len(data) <= 60_000 and mime in ("image/webp", "image/jpeg")
    import io

    with Image.open(io.BytesIO(data)) as img:
        assert max(img.size) <= 768


def test_a_sidecar_that_is_not_an_object_falls_back_to_the_embedded_parameters(store):
    """A hand-edited sidecar ("text", [1, 2, 3]) made list_images fail for every image."""
    stored = store.save(_image(), {"prompt": "luca on the pier", "seed": 3})
    for bad in ('"just a string"', "[1, 2, 3]", "null", "{not json"):
        stored.path.with_suffix(".json").write_text(bad)
        metadata = store.get(stored.id).metadata
        assert metadata["prompt"] == "luca on the pier" and metadata["seed"] == 3  # from the PNG's own text
