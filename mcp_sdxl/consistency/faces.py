"""Image conversion, YuNet face detection and 5-point alignment shared by both backends."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from mcp_sdxl.errors import NotFoundError, UserInputError

# ArcFace's canonical 112x112 landmark template (eyes, nose, mouth corners, subject's right first).
# SFace was trained on the same alignment, so both backends share it.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


@dataclass(frozen=True)
class DetectedFace:
    box: tuple[float, float, float, float]  # x, y, width, height in image pixels
    landmarks: np.ndarray  # (5, 2), same point order as ARCFACE_TEMPLATE
    score: float

    @property
    def area(self) -> float:
        return max(self.box[2], 0.0) * max(self.box[3], 0.0)


def largest(faces: list[DetectedFace]) -> DetectedFace | None:
    """The face to score when an image holds several: the largest box (the subject, not bystanders)."""
    return max(faces, key=lambda f: f.area, default=None)


def pil_to_bgr(image: Image.Image) -> np.ndarray:
    """PIL (any mode) -> contiguous uint8 BGR, the layout OpenCV and insightface expect."""
    if not isinstance(image, Image.Image):
        raise UserInputError(f"expected a PIL image, got {type(image).__name__}")
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb[:, :, ::-1])


def open_image(path: str | Path) -> Image.Image:
    """Open an image file fully (so the file handle is closed) or raise an error the caller can act on."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UserInputError(f"{path} is not a readable image (PNG, JPEG or WebP work): {exc}") from exc


def align(image_bgr: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp the face so its 5 landmarks land on the template (similarity transform)."""
    dst = ARCFACE_TEMPLATE * (size / 112.0)
    src = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
    matrix, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
    if matrix is None:  # degenerate landmarks: fall back to a least-squares fit on all points
        matrix, _ = cv2.estimateAffinePartial2D(src, dst, method=0)
    if matrix is None:
        raise ValueError("could not align face landmarks")
    return cv2.warpAffine(image_bgr, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


class YuNetDetector:
    """OpenCV's YuNet face detector. Not thread-safe: callers serialise (ConsistencyChecker's lock)."""

    def __init__(self, model_path: Path, score_threshold: float) -> None:
        # create() sets the net's default target, which OpenCV 5's graph engine answers with a WARN line on
        # stderr ("Targets are not supported by the new graph engine"): nothing is wrong, so no warning
        logging_ = cv2.utils.logging
        level = logging_.getLogLevel()
        logging_.setLogLevel(min(level, logging_.LOG_LEVEL_ERROR))
        try:
            self._detector = cv2.FaceDetectorYN.create(str(model_path), "", (320, 320), score_threshold, 0.3, 5000)
        finally:
            logging_.setLogLevel(level)
        self._lock = threading.Lock()

    def detect(self, image_bgr: np.ndarray) -> list[DetectedFace]:
        height, width = image_bgr.shape[:2]
        with self._lock:
            self._detector.setInputSize((width, height))
            _, rows = self._detector.detect(image_bgr)
        if rows is None:
            return []
        faces = []
        for row in np.asarray(rows, dtype=np.float32):
            x, y, w, h = (float(v) for v in row[:4])
            faces.append(DetectedFace((x, y, w, h), row[4:14].reshape(5, 2).copy(), float(row[14])))
        return faces
