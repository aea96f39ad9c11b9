"""Control-map preprocessing on real photos (scikit-image's sample data) and a tiny local depth model.

Photos: skimage.data.astronaut() (Eileen Collins, half-body portrait) for canny and pose, and
skimage.data.coffee() (a cup, no person) for the no-person error. Pose detection uses MediaPipe
0.10.21's bundled model; depth uses a random-init DPT built from a config and saved to a temp folder.
"""

from __future__ import annotations

import os
import shutil
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed hub lookup would otherwise retry for ~23 s

import numpy as np
import pytest
from PIL import Image

from mcp_sdxl.engine import preprocess as pp
from mcp_sdxl.engine.preprocess import openpose, pose_detect
from mcp_sdxl.errors import NotFoundError, UserInputError

skdata = pytest.importorskip("skimage.data")

REQUIRED_PRESETS = {"standing", "waving", "running", "sitting", "jumping"}


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return Image.fromarray(skdata.coffee())


def nonblack(img: Image.Image) -> np.ndarray:
    return np.asarray(img).max(axis=2) > 0


# ------------------------------------------------------------------------------------------------ canny
def test_canny_edge_map_format_and_threshold_density(astronaut):
    low = pp.canny_map(astronaut, 512, 512, low=50, high=100)
    high = pp.canny_map(astronaut, 512, 512, low=150, high=250)
    for edges in (low, high):
        arr = np.asarray(edges)
        assert edges.mode == "RGB" and edges.size == (512, 512)
        assert set(np.unique(arr)) <= {0, 255}  # white edges on black, nothing in between
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    n_low, n_high = nonblack(low).sum(), nonblack(high).sum()
    assert n_high > 0.02 * 512 * 512  # a real photo has plenty of edges
    assert n_low > 1.3 * n_high  # lower thresholds keep more edges


def test_canny_via_prepare_control_fits_target_and_validates(astronaut):
    out = pp.prepare_control("canny", astronaut, preprocess=True, width=832, height=1216,
                             settings={"canny": {"low_threshold": 100, "high_threshold": 200}})
    assert out.size == (832, 1216) and nonblack(out).mean() > 0.01
    with pytest.raises(UserInputError, match="must not exceed"):
        pp.canny_map(astronaut, 64, 64, low=200, high=100)
    with pytest.raises(UserInputError, match="0 to 255"):
        pp.canny_map(astronaut, 64, 64, low=-1, high=100)


# ------------------------------------------------------------------------------------------------- pose
def test_pose_detected_in_photo_and_rendered(astronaut):
    pytest.importorskip("mediapipe")
    (person,) = pp.detect_pose(astronaut)
    nose, neck = person.point("nose"), person.point("neck")
    r_sh, l_sh = person.point("right_shoulder"), person.point("left_shoulder")
    assert None not in (nose, neck, r_sh, l_sh)
    assert r_sh[0] < neck[0] < l_sh[0]  # facing the camera: her right shoulder is on the image left
    assert nose[1] < neck[1] - 0.1  # head clearly above the neck
    assert 0.3 < nose[0] < 0.6 and 0.1 < nose[1] < 0.4  # the face is there in the photo

    # Square photo on a square canvas: canvas coordinates equal photo coordinates.
    settings = pp.PreprocessSettings(detect_hands=False, detect_face=False)
    img = pp.prepare_control("pose", astronaut, preprocess=True, width=512, height=512, settings=settings)
    arr = np.asarray(img)
    assert img.size == (512, 512) and 0.001 < nonblack(img).mean() < 0.2
    for name, color_index in (("neck", 1), ("nose", 0), ("right_shoulder", 2)):
        x, y = (int(v * 512) for v in person.point(name))
        assert tuple(arr[y, x]) == openpose.COLORS[color_index], name  # joint dot in its OpenPose colour
    assert not nonblack(img)[400:, 300:].any()  # nothing drawn where no body part was detected


def test_pose_with_face_and_other_aspect(astronaut):
    pytest.importorskip("mediapipe")
    (person,) = pp.detect_pose(astronaut, hands=True, face=True)
    assert person.face is not None and len(person.face) == 70
    img = pp.prepare_control("pose", astronaut, preprocess=True, width=768, height=512,
                             settings={"resize_mode": "pad"})
    white = (np.asarray(img) == 255).all(axis=2)
    assert img.size == (768, 512) and white.sum() > 100  # face dots are white
    _, xs = np.nonzero(white)
    assert 128 <= xs.min() and xs.max() < 640  # padded: the 512-wide photo sits in the middle


def test_no_person_gives_clear_error(coffee):
    pytest.importorskip("mediapipe")
    for image in (coffee, Image.new("RGB", (256, 256), (128, 128, 128))):
        with pytest.raises(UserInputError, match="No person") as err:
            pp.prepare_control("pose", image, preprocess=True, width=512, height=512, settings={})
        assert "pose preset" in str(err.value) and "preprocess=false" in str(err.value)


def test_controlnet_aux_backend_used_when_weights_present(tmp_path, monkeypatch, astronaut):
    """A stand-in controlnet_aux: checks the local-folder detection and the keypoint adapter."""
    kp = types.SimpleNamespace
    body = [kp(x=0.5, y=0.2), kp(x=0.5, y=0.3), kp(x=0.4, y=0.3), None, None, kp(x=0.6, y=0.3)] + [None] * 12
    calls = []

    class FakeDetector:
        @classmethod
        def from_pretrained(cls, path):
            calls.append(path)
            return cls()

        def detect_poses(self, rgb, include_hand=False, include_face=False):
            hand = [kp(x=-1.0, y=-1.0)] * 21
            return [kp(body=kp(keypoints=body), left_hand=hand, right_hand=None, face=None)]

    monkeypatch.setitem(sys.modules, "controlnet_aux", types.SimpleNamespace(OpenposeDetector=FakeDetector))
    (tmp_path / "body_pose_model.pth").write_bytes(b"")
    (person,) = pp.detect_pose(astronaut, hands=True, annotator_dir=str(tmp_path))
    assert calls == [str(tmp_path.resolve())]
    assert person.point("neck") == (0.5, 0.3) and person.left_hand == [None] * 21


def test_unusable_controlnet_aux_falls_back_or_errors(tmp_path, monkeypatch, astronaut):
    monkeypatch.setitem(sys.modules, "controlnet_aux", None)  # import fails, as with torchvision broken
    (tmp_path / "body_pose_model.pth").write_bytes(b"")
    with pytest.raises(UserInputError, match="controlnet_aux"):
        pp.detect_pose(astronaut, backend="controlnet_aux", annotator_dir=str(tmp_path))
    if pose_detect.mediapipe_available():  # "auto" quietly uses MediaPipe instead
        assert pp.detect_pose(astronaut, annotator_dir=str(tmp_path))


def test_render_openpose_hands_face_and_scaling():
    body = [None] * 18
    body[1], body[2], body[3] = (0.5, 0.3), (0.4, 0.3), (0.35, 0.45)  # neck, right shoulder, right elbow
    hand = [(0.30 + 0.005 * i, 0.5 + 0.004 * i) for i in range(21)]
    face = [(0.45 + 0.001 * i, 0.15) for i in range(70)]
    person = pp.PoseKeypoints(body, left_hand=hand, face=face)
    img = np.asarray(pp.render_openpose([person], 512, 512))
    assert ((img == (0, 0, 255)).all(axis=2)).any()  # hand joints: blue dots, as controlnet_aux draws them
    assert ((img == 255).all(axis=2)).any()  # face: white dots
    no_extras = np.asarray(pp.render_openpose([person], 512, 512, hands=False, face=False))
    assert not (no_extras == 255).all(axis=2).any() and not (no_extras == (0, 0, 255)).all(axis=2).any()
    # Line widths scale with the canvas (controlnet_aux draws at 512 px and resizes): 4x the pixels at 2x.
    big = pp.render_openpose([pp.PoseKeypoints(body)], 1024, 1024)
    small = pp.render_openpose([pp.PoseKeypoints(body)], 512, 512)
    assert 3.0 < nonblack(big).sum() / nonblack(small).sum() < 5.0


# ---------------------------------------------------------------------------------------------- presets
def test_presets_listed_and_unknown_name():
    names = pp.list_pose_presets()
    assert REQUIRED_PRESETS <= set(names)
    with pytest.raises(NotFoundError, match="standing"):
        pp.render_pose_preset("moonwalk", 512, 512)
    with pytest.raises(NotFoundError):
        pp.render_pose_preset("../poses/standing", 512, 512)


@pytest.mark.parametrize("name", sorted(pp.list_pose_presets()))
@pytest.mark.parametrize("size", [(832, 1216), (1024, 576)])
def test_every_preset_renders(name, size):
    width, height = size
    img = pp.render_pose_preset(name, width, height)
    mask = nonblack(img)
    assert img.size == size and img.mode == "RGB"
    assert mask.mean() > 0.003  # a real skeleton, not a few dots
    ys, xs = np.nonzero(mask)
    border = 0.02
    assert xs.min() > border * width and xs.max() < (1 - border) * width  # limbs inside the image
    assert ys.min() > border * height and ys.max() < (1 - border) * height
    # Uniform scaling fills the limiting dimension: the body spans most of it.
    assert max((xs.max() - xs.min()) / width, (ys.max() - ys.min()) / height) > 0.7
    # Every body limb's colour is present (the ControlNet reads limbs by colour).
    colors = {tuple(c) for c in np.asarray(img)[mask]}
    assert openpose.COLORS[1] in colors and openpose.COLORS[0] in colors


def test_preset_through_prepare_control():
    img = pp.prepare_control("pose", None, preprocess=True, width=640, height=640, settings=None,
                             pose_preset="waving")
    assert img.size == (640, 640) and nonblack(img).any()
    with pytest.raises(UserInputError, match="not both"):
        pp.prepare_control("pose", img, preprocess=False, width=64, height=64, settings={}, pose_preset="waving")
    with pytest.raises(UserInputError, match="pose_preset"):
        pp.prepare_control("pose", None, preprocess=True, width=64, height=64, settings={})


# ------------------------------------------------------------------------------------------------ depth
@pytest.fixture(scope="module")
def tiny_dpt_dir(tmp_path_factory):
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessorPil

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=64, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                       neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                       reassemble_factors=[4, 2, 1, 0.5])
    folder = tmp_path_factory.mktemp("tiny-dpt")
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessorPil(size={"height": 64, "width": 64}, keep_aspect_ratio=False).save_pretrained(folder)
    return folder


def test_depth_from_local_tiny_dpt(tiny_dpt_dir, astronaut, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pp.clear_depth_cache()
    out = pp.prepare_control("depth", astronaut, preprocess=True, width=320, height=448,
                             settings={"depth": {"model": str(tiny_dpt_dir)}})
    arr = np.asarray(out)
    assert out.size == (320, 448) and out.mode == "RGB"
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()  # grayscale
    assert arr.max() > arr.min()  # the crop may cut off the extremes, so no exact range here
    full = np.asarray(pp.estimate_depth(astronaut, str(tiny_dpt_dir)))
    assert full.shape == (512, 512, 3) and full.min() == 0 and full.max() == 255  # normalized per image
    # Loaded once, then served from the cache.
    assert pp.load_depth_model(str(tiny_dpt_dir)) is pp.load_depth_model(str(tiny_dpt_dir))


def test_depth_hub_id_from_local_cache(tiny_dpt_dir, astronaut, tmp_path, monkeypatch):
    """A hub id works when its snapshot is in the HF cache (built here by hand), without network."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--tiny-org--tiny-dpt"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dpt_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = pp.prepare_control("depth", astronaut, preprocess=True, width=64, height=64,
                             settings={"depth_model": "tiny-org/tiny-dpt"})
    assert out.size == (64, 64)


@pytest.mark.parametrize("model", [None, "/nonexistent/depth-model", "no-such-org/no-such-depth-model", "EMPTY"])
def test_missing_depth_model_gives_clear_error(model, astronaut, tmp_path):
    if model == "EMPTY":  # a folder that exists but holds no model
        model = str(tmp_path)
    with pytest.raises(UserInputError, match="preprocess=false") as err:
        pp.prepare_control("depth", astronaut, preprocess=True, width=64, height=64,
                           settings={"depth_model": model})
    assert "depth" in str(err.value)


# ------------------------------------------------------------------------------------ ready maps, misc
def test_ready_maps_are_converted_and_fitted():
    rgba = Image.new("RGBA", (100, 50), (255, 0, 0, 0))  # fully transparent red -> black
    rgba.putpixel((10, 10), (0, 255, 0, 255))
    out = pp.prepare_control("pose", rgba, preprocess=False, width=200, height=100, settings={})
    arr = np.asarray(out)
    assert out.size == (200, 100) and out.mode == "RGB" and arr[..., 0].max() == 0 and arr[..., 1].max() > 0

    depth16 = Image.fromarray(np.linspace(0, 4000, 64 * 64, dtype=np.uint16).reshape(64, 64))
    out = pp.prepare_ready_map(depth16, 64, 64)
    assert out.mode == "RGB" and np.asarray(out).max() == 255  # scaled, not clipped at 255

    gray = Image.new("L", (300, 100), 200)
    padded = pp.prepare_control("depth", gray, preprocess=False, width=100, height=100,
                                settings={"resize_mode": "pad"})
    col = np.asarray(padded)[:, 50, 0]
    assert col[0] == 0 and col[50] == 200  # letterboxed with black
    cropped = pp.prepare_control("canny", gray, preprocess=False, width=100, height=100, settings={})
    assert np.asarray(cropped).min() == 200  # crop mode covers the canvas


def test_entry_point_input_errors(astronaut):
    with pytest.raises(UserInputError, match="control kind"):
        pp.prepare_control("normal", astronaut, preprocess=True, width=64, height=64, settings={})
    with pytest.raises(UserInputError, match="needs a reference image"):
        pp.prepare_control("depth", None, preprocess=True, width=64, height=64, settings={})
    with pytest.raises(UserInputError, match="width"):
        pp.prepare_control("canny", astronaut, preprocess=True, width=0, height=64, settings={})
    with pytest.raises(UserInputError, match="unknown preprocessing setting"):
        pp.prepare_control("canny", astronaut, preprocess=True, width=64, height=64, settings={"cany_low": 5})
    with pytest.raises(UserInputError, match="resize_mode"):
        pp.prepare_control("canny", astronaut, preprocess=False, width=64, height=64,
                           settings={"resize_mode": "zoom"})
