"""ArcFace (512-d) embeddings through insightface, from a LOCAL model pack (nothing is downloaded).

The pack is an unzipped insightface release (buffalo_l, antelopev2): loose .onnx files. Each file is
routed by insightface's own model_zoo.get_model (as FaceAnalysis does), keeping the detector and the
recognition model. A pack without a detector (e.g. only w600k_r50.onnx copied over) detects with
YuNet instead: its 5 landmarks are in the same order insightface's alignment expects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mcp_sdxl.consistency.faces import DetectedFace
from mcp_sdxl.errors import ConfigError

log = logging.getLogger(__name__)


def find_pack_dir(root: Path, pack: str) -> Path | None:
    """The folder holding the pack's .onnx files, or None when the models are not installed."""
    for candidate in (root / "models" / pack, root / pack):
        if candidate.is_dir() and any(candidate.glob("*.onnx")):
            return candidate
    return None


class ArcFaceBackend:
    name = "arcface"

    def __init__(
        self,
        pack_dir: Path,
        providers: list[str],
        det_size: int,
        detection_threshold: float,
        fallback_detector: Callable[[], object],
    ) -> None:
        # Imported here: insightface pulls onnxruntime/scikit-image, only needed when ArcFace is used.
        from insightface.app.common import Face
        from insightface.model_zoo import model_zoo

        self._face_cls = Face
        detector = recognizer = None
        for onnx_file in sorted(pack_dir.glob("*.onnx")):
            try:
                model = model_zoo.get_model(str(onnx_file), providers=list(providers))
            except Exception as exc:  # a broken or foreign file: say which one
                raise ConfigError(f"consistency: insightface could not load {onnx_file}: {exc}") from exc
            task = getattr(model, "taskname", None)
            if task == "detection" and detector is None:
                detector = model
            elif task == "recognition" and recognizer is None:
                recognizer = model
            # landmark / genderage models are not needed for identity: dropped.
        if recognizer is None:
            raise ConfigError(
                f"consistency: no ArcFace recognition model (112x112 input) among the .onnx files in "
                f"{pack_dir}; unzip buffalo_l or antelopev2 there, or set backend: sface"
            )
        recognizer.prepare(0)
        self._recognizer = recognizer
        self.dim = int(recognizer.output_shape[-1])
        if detector is not None:
            detector.prepare(0, input_size=(det_size, det_size), det_thresh=detection_threshold)
            self._scrfd = detector
            self._yunet = None
            self.detector_name = "scrfd"
        else:
            log.info("ArcFace pack %s has no detector; using YuNet for detection", pack_dir)
            self._scrfd = None
            self._yunet = fallback_detector()
            self.detector_name = "yunet"
        self.recognition_file = Path(recognizer.model_file).name

    def faces(self, image_bgr: np.ndarray) -> list[DetectedFace]:
        if self._yunet is not None:
            return self._yunet.detect(image_bgr)
        bboxes, kpss = self._scrfd.detect(image_bgr, max_num=0)
        if kpss is None:  # a detector without landmarks cannot feed the aligner
            raise ConfigError("consistency: the pack's detector gives no landmarks; use buffalo_l or antelopev2")
        faces = []
        for (x1, y1, x2, y2, score), kps in zip(bboxes, kpss, strict=True):
            box = (float(x1), float(y1), float(x2 - x1), float(y2 - y1))
            faces.append(DetectedFace(box, np.asarray(kps, dtype=np.float32), float(score)))
        return faces

    def embed_face(self, image_bgr: np.ndarray, face: DetectedFace) -> np.ndarray:
        x, y, w, h = face.box
        candidate = self._face_cls(bbox=np.array([x, y, x + w, y + h], np.float32), kps=face.landmarks,
                                   det_score=face.score)
        # insightface's own alignment (norm_crop) and preprocessing for its ArcFace models.
        embedding = self._recognizer.get(image_bgr, candidate)
        return np.asarray(embedding, dtype=np.float32).reshape(-1)
