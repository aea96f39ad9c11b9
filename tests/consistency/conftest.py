"""Fixtures: real face photos that ship inside installed packages, and small ArcFace-shaped ONNX
files so insightface's real loading path runs without downloadable weights."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from mcp_sdxl.config.consistency import ConsistencyConfig
from mcp_sdxl.consistency import ConsistencyChecker

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _package_file(package: str, *parts: str) -> Path:
    # find_spec locates the package without importing it (skimage/insightface imports are slow).
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    assert path.is_file(), path
    return path


def _open(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    """Eileen Collins, skimage's data/astronaut.png (512x512)."""
    return _open(_package_file("skimage", "data", "astronaut.png"))


@pytest.fixture(scope="session")
def hanks() -> Image.Image:
    """Tom Hanks, insightface's data/images/Tom_Hanks_54745.png (112x112 face crop)."""
    return _open(_package_file("insightface", "data", "images", "Tom_Hanks_54745.png"))


@pytest.fixture(scope="session")
def group_photo() -> Image.Image:
    """Six different people, insightface's data/images/t1.jpg."""
    return _open(_package_file("insightface", "data", "images", "t1.jpg"))


@pytest.fixture(scope="session")
def gradient() -> Image.Image:
    ramp = np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1))
    return Image.fromarray(np.dstack([ramp, ramp[::-1], ramp.T]))


@pytest.fixture(scope="session")
def sface_checker(tmp_path_factory) -> ConsistencyChecker:
    """One SFace checker for the session (auto backend, no ArcFace pack under the models root)."""
    root = tmp_path_factory.mktemp("models-sface")
    return ConsistencyChecker(ConsistencyConfig(), root)


# -- ONNX builders --------------------------------------------------------------------------------

def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # readable by every onnxruntime this project supports
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_arcface_onnx(path: Path, seed: int = 0) -> Path:
    """ArcFace-shaped recognition model: (N,3,112,112) -> (N,512), a fixed random projection of the
    8x8-pooled aligned face. Not a face model; it makes insightface route it as 'recognition'."""
    weights = np.random.default_rng(seed).standard_normal((3 * 14 * 14, 512)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8], name="pool"),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"),
            helper.make_node("MatMul", ["flat", "proj"], ["fc1"], name="fc"),
        ],
        "fake_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["None", 512])],
        initializer=[numpy_helper.from_array(weights, "proj")],
    )
    return _save(graph, path)


def build_scrfd_onnx(path: Path, box_xyxy, kps, size: int = 640) -> Path:
    """SCRFD-shaped detector (9 outputs: scores/boxes/keypoints at strides 8/16/32, 2 anchors) with a
    fixed 640x640 input that always reports ONE face at box_xyxy / kps (given in 640x640 input
    pixels). Lets insightface's SCRFD decoding run for real without trained weights."""
    outputs, nodes, inits = [], [], []
    x1, y1, x2, y2 = box_xyxy
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    heads = {}
    for stride in (8, 16, 32):
        n = (size // stride) ** 2 * 2
        score = np.zeros((n, 1), np.float32)
        bbox = np.zeros((n, 4), np.float32)
        kp = np.zeros((n, 10), np.float32)
        if stride == 32:
            col, row = int(cx // stride), int(cy // stride)
            ax, ay = col * stride, row * stride  # anchor centre, as SCRFD computes it
            i = (row * (size // stride) + col) * 2
            score[i] = 0.95
            bbox[i] = np.array([ax - x1, ay - y1, x2 - ax, y2 - ay]) / stride
            kp[i] = (np.asarray(kps, np.float32) - [ax, ay]).reshape(-1) / stride
        heads[stride] = (score, bbox, kp)
    for kind, col in (("score", 0), ("bbox", 1), ("kps", 2)):
        for stride in (8, 16, 32):
            name = f"{kind}_{stride}"
            value = heads[stride][col]
            inits.append(numpy_helper.from_array(value, f"{name}_const"))
            nodes.append(helper.make_node("Identity", [f"{name}_const"], [name], name=f"id_{name}"))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(
        nodes, "fake_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, size, size])],
        outputs, initializer=inits,
    )
    return _save(graph, path)


@pytest.fixture(scope="session")
def onnx_builders():
    """The builders above, as a fixture: test modules must not `import conftest` (other rooms have one)."""
    return SimpleNamespace(arcface=build_arcface_onnx, scrfd=build_scrfd_onnx)
