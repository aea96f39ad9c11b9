"""ArcFace backend through insightface's real loading code (model_zoo routing, ArcFaceONNX alignment
and preprocessing, SCRFD decoding) on small ONNX files built here: no weights can be downloaded."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mcp_sdxl.config.consistency import ConsistencyConfig
from mcp_sdxl.consistency import ConsistencyChecker
from mcp_sdxl.errors import ConfigError, NotFoundError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # insightface vs scikit-image 0.26

# The astronaut's face as YuNet finds it in the 512x512 photo (x, y, w, h) and its 5 landmarks.
ASTRO_BOX = (178.04, 62.56, 90.38, 113.86)
ASTRO_KPS = [[200.15, 101.80], [247.22, 102.56], [220.30, 124.73], [198.87, 143.18], [239.81, 143.87]]


def _pack(root, with_detector: bool, builders):
    pack = root / "insightface" / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    builders.arcface(pack / "w600k_r50.onnx")
    if with_detector:
        s = 640 / 512  # SCRFD letterboxes the 512x512 photo into its 640x640 input
        x, y, w, h = ASTRO_BOX
        builders.scrfd(pack / "det_10g.onnx", [x * s, y * s, (x + w) * s, (y + h) * s], np.array(ASTRO_KPS) * s)
    return root


def test_auto_picks_arcface_when_pack_present(onnx_builders, tmp_path, astronaut, hanks):
    checker = ConsistencyChecker(ConsistencyConfig(), _pack(tmp_path, with_detector=False, builders=onnx_builders))
    assert checker.backend_name == "arcface"
    assert checker.resolve_threshold() == pytest.approx(0.65)
    assert checker.embedding_dim == 512
    assert checker._backend.detector_name == "yunet"  # pack without detector: YuNet finds the face
    assert checker._backend.recognition_file == "w600k_r50.onnx"
    ref = checker.embed(astronaut)
    assert ref.shape == (512,) and np.linalg.norm(ref) == pytest.approx(1.0, abs=1e-5)
    [same, other] = checker.score([astronaut, hanks], [ref])
    assert same.backend == "arcface" and same.threshold == pytest.approx(0.65)
    assert same.similarity == pytest.approx(1.0, abs=1e-4) and same.is_match
    # the fake model is no face model, but a different photo must not be scored identical
    assert other.face_found and other.similarity < 0.99


def test_scrfd_detector_from_pack_is_used(onnx_builders, tmp_path, astronaut):
    root = _pack(tmp_path, with_detector=True, builders=onnx_builders)
    checker = ConsistencyChecker(ConsistencyConfig(backend="arcface"), root)
    ref = checker.embed(astronaut)
    assert checker._backend.detector_name == "scrfd"
    [s] = checker.score([astronaut], [ref])
    assert s.faces_detected == 1
    # SCRFD's box comes back in photo pixels (x, y, w, h), undoing insightface's letterbox scale
    assert s.face_box == pytest.approx(ASTRO_BOX, abs=0.5)
    # same landmarks as YuNet's, so the embedding matches the YuNet-detected one
    other_root = _pack(tmp_path / "other", with_detector=False, builders=onnx_builders)
    yunet = ConsistencyChecker(ConsistencyConfig(), other_root)
    assert float(yunet.embed(astronaut) @ ref) > 0.999


def test_preset_threshold_applies_to_arcface_only(onnx_builders, tmp_path, sface_checker):
    arc = ConsistencyChecker(ConsistencyConfig(), _pack(tmp_path, with_detector=False, builders=onnx_builders))
    assert arc.resolve_threshold(preset_threshold=0.6) == pytest.approx(0.6)
    assert arc.resolve_threshold(threshold=0.7, preset_threshold=0.6) == pytest.approx(0.7)
    assert sface_checker.resolve_threshold(preset_threshold=0.65) == pytest.approx(0.363)


def test_references_are_per_backend(onnx_builders, tmp_path, astronaut):
    root = _pack(tmp_path, with_detector=False, builders=onnx_builders)
    arc = ConsistencyChecker(ConsistencyConfig(), root)
    sface = ConsistencyChecker(ConsistencyConfig(backend="sface"), root)
    [arc_file] = arc.enroll("luca", [astronaut])
    assert arc_file == root / "references" / "luca" / "arcface" / "001.npy"
    assert np.load(arc_file).shape == (512,)
    # the SFace checker sees no references for luca: 512-d ArcFace files are never mixed in
    with pytest.raises(NotFoundError, match="sface"):
        sface.references_for("luca")
    [sface_file] = sface.enroll("luca", [astronaut])
    assert sface_file.parent.name == "sface" and np.load(sface_file).shape == (128,)
    assert len(arc.references_for("luca")) == 1 and arc.references_for("luca")[0].shape == (512,)
    # an explicit preset path of the wrong backend is skipped with a clear reason
    with pytest.raises(NotFoundError, match=r"\(512,\), but sface embeddings are 128-d"):
        sface.references_for("nobody", preset_paths=[arc_file])


def test_forced_arcface_without_models_is_a_config_error(tmp_path):
    checker = ConsistencyChecker(ConsistencyConfig(backend="arcface"), tmp_path)
    assert checker.backend_name == "arcface"  # names resolve lazily; models load on first use
    with pytest.raises(ConfigError, match="buffalo_l"):
        checker.embed(Image.new("RGB", (64, 64)))


def test_pack_without_recognition_model_is_a_config_error(onnx_builders, tmp_path, astronaut):
    pack = tmp_path / "insightface" / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    onnx_builders.scrfd(pack / "det_10g.onnx", [0, 0, 10, 10], np.zeros((5, 2)))
    checker = ConsistencyChecker(ConsistencyConfig(), tmp_path)
    assert checker.backend_name == "arcface"
    with pytest.raises(ConfigError, match="no ArcFace recognition model"):
        checker.embed(astronaut)
