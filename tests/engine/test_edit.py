"""The tiled pass behind upscale_image: tiles cover the canvas, overlap, and blend without seams."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mcp_sdxl.engine.edit import TileBlender, pad_to, tile_grid


@pytest.mark.parametrize("width, height, tile, overlap, multiple", [
    (2048, 2048, 1024, 128, 8), (4096, 3072, 1024, 128, 8), (256, 256, 128, 32, 32), (300, 200, 128, 32, 32),
    (96, 500, 128, 32, 32), (1000, 1000, 1024, 128, 8),
])
def test_tiles_cover_the_canvas_with_the_overlap(width, height, tile, overlap, multiple):
    grid = tile_grid(width, height, tile, overlap, multiple)
    canvas_w, canvas_h = grid.canvas
    assert canvas_w >= width and canvas_h >= height and canvas_w % multiple == 0 == canvas_h % multiple
    assert all(side <= tile and side % multiple == 0 for side in grid.tile)
    covered = np.zeros((canvas_h, canvas_w), bool)
    for x0, y0, x1, y1 in grid.boxes():
        assert 0 <= x0 and x1 <= canvas_w and 0 <= y0 and y1 <= canvas_h
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    for starts, side in ((grid.xs, grid.tile[0]), (grid.ys, grid.tile[1])):
        for a, b in zip(starts, starts[1:]):
            assert a + side - b >= grid.overlap  # neighbours share at least the overlap


def test_blending_the_same_picture_gives_it_back_exactly():
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    grid = tile_grid(300, 200, 128, 32, 32)
    canvas = pad_to(picture, grid.canvas)
    blender = TileBlender(grid)
    for box in grid.boxes():
        blender.add(box, canvas.crop(box))
    assert np.array_equal(np.asarray(blender.image(picture.size)), np.asarray(picture))


def test_overlaps_fade_from_one_tile_into_the_next():
    grid = tile_grid(256, 128, 128, 32, 32)
    blender = TileBlender(grid)
    for i, box in enumerate(grid.boxes()):
        blender.add(box, Image.new("RGB", (box[2] - box[0], box[3] - box[1]), (0, 0, 0) if i == 0 else (255, 255, 255)))
    row = np.asarray(blender.image((256, 128)))[64, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)  # a ramp, not a step: no seam
    assert len(set(row[grid.xs[1]:grid.xs[0] + grid.tile[0]])) > 8


def test_edit_pipelines_share_the_loaded_weights(tiny_cache, tmp_path):
    """img2img and inpaint run on the loaded pipeline's own modules: no second copy of any weight."""
    import torch

    from mcp_sdxl.config import load_settings
    from mcp_sdxl.engine import Engine, GenerationRequest
    from mcp_sdxl.engine import edit as edit_module
    from tests.conftest import CONFIGS

    home = tmp_path / "home"
    home.mkdir()
    (home / "tiny").symlink_to(tiny_cache, target_is_directory=True)
    engine = Engine(load_settings(CONFIGS, home=home, profile="tiny"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        source = engine.generate(GenerationRequest(prompt="a boy", width=64, height=64, steps=2, seed=1)).image
        mask = Image.new("L", (64, 64), 0)
        for mask_or_none in (None, mask):
            request = GenerationRequest(prompt="a boy", width=64, height=64, steps=4, seed=2, init_image=source,
                                        mask=mask_or_none, strength=0.5)
            pipe, extra = edit_module.prepare(engine, request)
            for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
                assert getattr(pipe, name) is getattr(engine.pipe, name)
        # an all-black mask repaints nothing: the source comes back pixel for pixel
        kept = engine.generate(GenerationRequest(prompt="a girl", width=64, height=64, steps=4, seed=3,
                                                 init_image=source, mask=mask, strength=1.0)).image
        assert np.array_equal(np.asarray(kept), np.asarray(source))
    finally:
        torch.set_num_threads(threads)
        engine.unload()
