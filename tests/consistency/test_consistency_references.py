"""Enroll, reference loading and the errors a caller gets for bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from mcp_sdxl.config.consistency import ConsistencyConfig
from mcp_sdxl.consistency import ConsistencyChecker, open_image
from mcp_sdxl.errors import NotFoundError, UserInputError


@pytest.fixture
def checker(tmp_path):
    return ConsistencyChecker(ConsistencyConfig(), tmp_path)


def test_enroll_writes_numbered_per_backend_files_atomically(checker, tmp_path, astronaut):
    flipped = astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    first = checker.enroll("luca", [astronaut, flipped])
    second = checker.enroll("luca", [astronaut.resize((300, 300)), astronaut])  # the same picture again: not stored
    folder = tmp_path / "references" / "luca" / "sface"
    assert first == [folder / "001.npy", folder / "002.npy"] and second == [folder / "003.npy"]
    assert checker.enroll("luca", [flipped, flipped]) == []
    assert sorted(p.name for p in folder.iterdir()) == ["001.npy", "002.npy", "003.npy"]  # no temp files left
    stored = np.load(first[0])
    assert stored.dtype == np.float32 and np.allclose(stored, checker.embed(astronaut), atol=1e-6)
    assert checker.store.characters("sface") == ["luca"] and checker.store.characters("arcface") == []


def test_enrolled_references_are_used_for_scoring(checker, astronaut, hanks):
    checker.enroll("luca", [astronaut, astronaut.resize((300, 300))])
    refs = checker.references_for("luca")
    assert len(refs) == 2
    same, other = checker.score([astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT), hanks], refs)
    assert same.is_match and same.references == 2 and not other.is_match


def test_enroll_with_a_faceless_image_stores_nothing(checker, tmp_path, astronaut, gradient):
    with pytest.raises(UserInputError, match="reference image 1 has no detectable face"):
        checker.enroll("luca", [astronaut, gradient])
    assert not (tmp_path / "references" / "luca").exists()  # all images are checked before writing


def test_concurrent_enrolls_of_one_picture_store_it_once(checker, tmp_path, astronaut):
    results, errors = [], []

    def run():
        try:
            results.extend(checker.enroll("luca", [astronaut]))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [p.name for p in results] == ["001.npy"]  # one file, whoever came first: the others saw it


def test_preset_paths_relative_to_models_root_and_stacked_arrays(checker, tmp_path, astronaut, hanks):
    a, h = checker.embed(astronaut), checker.embed(hanks)
    (tmp_path / "presets").mkdir()
    np.save(tmp_path / "presets" / "two.npy", np.stack([a * 3.0, h]))  # (2, 128), unnormalised
    refs = checker.references_for("luca", preset_paths=["presets/two.npy"])
    assert len(refs) == 2
    assert np.allclose(refs[0], a, atol=1e-6) and np.linalg.norm(refs[0]) == pytest.approx(1.0)
    # absolute paths work too, and stored + preset + image references add up
    checker.enroll("luca", [astronaut])
    refs = checker.references_for("luca", preset_paths=[tmp_path / "presets" / "two.npy"], reference_images=[hanks])
    assert len(refs) == 4


def test_bad_preset_files_are_skipped_but_good_ones_kept(checker, tmp_path, astronaut):
    np.save(tmp_path / "wrong_dim.npy", np.ones(512, np.float32))
    (tmp_path / "garbage.npy").write_bytes(b"not numpy")
    checker.enroll("luca", [astronaut])
    refs = checker.references_for("luca", preset_paths=["wrong_dim.npy", "garbage.npy", "missing.npy"])
    assert len(refs) == 1
    with pytest.raises(NotFoundError) as info:
        checker.references_for("alberto", preset_paths=["wrong_dim.npy", "missing.npy"])
    msg = str(info.value)
    assert "wrong_dim.npy: shape (512,), but sface embeddings are 128-d" in msg
    assert "missing.npy: file not found" in msg and "Characters with sface references: luca" in msg


def test_unknown_character_without_references_says_what_works(checker):
    with pytest.raises(NotFoundError, match=r"'ghost'.*enroll.*reference images.*none yet"):
        checker.references_for("ghost")


def test_reference_images_alone_work_without_a_character(checker, astronaut, gradient):
    assert len(checker.references_for(None, reference_images=[astronaut])) == 1
    with pytest.raises(UserInputError, match="pass reference images"):
        checker.references_for(None)
    with pytest.raises(UserInputError, match="reference image 0 has no detectable face"):
        checker.references_for(None, reference_images=[gradient])


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 65, "a..b"])
def test_unsafe_character_names_are_refused(checker, astronaut, name):
    with pytest.raises(UserInputError, match="invalid character name"):
        checker.enroll(name, [astronaut])


@pytest.mark.parametrize("bad", [-0.1, 1.5, "high", float("nan")])
def test_threshold_outside_unit_interval_is_refused(checker, astronaut, bad):
    ref = checker.embed(astronaut)
    with pytest.raises(UserInputError, match="between 0 and 1"):
        checker.score([astronaut], [ref], threshold=bad)
    with pytest.raises(UserInputError, match="between 0 and 1"):
        checker.resolve_threshold(preset_threshold=bad)


def test_score_needs_references_of_the_backend_size(checker, astronaut):
    with pytest.raises(UserInputError, match="enroll the character or pass reference images"):
        checker.score([astronaut], [])
    with pytest.raises(UserInputError, match=r"\[512\]-d but sface gives 128-d"):
        checker.score([astronaut], [np.ones(512, np.float32)])


def test_enroll_needs_images(checker):
    with pytest.raises(UserInputError, match="at least one image"):
        checker.enroll("luca", [])


def test_open_image(tmp_path, astronaut):
    astronaut.save(tmp_path / "a.png")
    img = open_image(tmp_path / "a.png")
    assert img.mode == "RGB" and img.size == (512, 512)
    (tmp_path / "bad.png").write_text("nope")
    with pytest.raises(UserInputError, match="not a readable image"):
        open_image(tmp_path / "bad.png")
    with pytest.raises(NotFoundError, match="not found"):
        open_image(tmp_path / "missing.png")
