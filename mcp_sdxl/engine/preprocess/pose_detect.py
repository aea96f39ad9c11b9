"""Find a person's pose in a photo and express it as OpenPose keypoints.

Two backends, both optional imports:
- controlnet_aux's OpenposeDetector (the ControlNet 1.1 annotator) when its weights sit in a local folder
  (body_pose_model.pth, hand_pose_model.pth, facenet.pth). It needs torchvision, which does not import
  beside a CPU-only torch, so it is tried and skipped quietly when unusable.
- MediaPipe 0.10.21 (the last release with `mp.solutions`, whose wheel bundles the pose, hand and face
  models, so it works offline). Its 33 landmarks are mapped onto the 18 OpenPose points.
Keypoints come back normalized to the source photo; the caller maps them onto the canvas.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import threading
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from mcp_sdxl.errors import UserInputError

from .native_logs import routine_native_logs_dropped
from .openpose import PoseKeypoints

log = logging.getLogger(__name__)

PoseBackend = Literal["auto", "mediapipe", "controlnet_aux"]
MIN_VISIBILITY = 0.5  # MediaPipe's own default threshold for drawing a landmark
MIN_BODY_POINTS = 4  # fewer than this is a false detection, not a usable pose

# OpenPose body index -> MediaPipe pose landmark index; the neck (1) is the mid-shoulder point.
_MP_BODY = {0: 0, 2: 12, 3: 14, 4: 16, 5: 11, 6: 13, 7: 15, 8: 24, 9: 26, 10: 28,
            11: 23, 12: 25, 13: 27, 14: 5, 15: 2, 16: 8, 17: 7}
# MediaPipe face-mesh vertices closest to the 68 iBUG/dlib points that OpenPose's face model uses.
_MP_FACE_68 = (
    162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389, 71, 63, 105,
    66, 107, 336, 296, 334, 293, 301, 168, 197, 5, 4, 75, 97, 2, 326, 305, 33, 160, 158, 133, 153,
    144, 362, 385, 387, 263, 373, 380, 61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181, 78, 82,
    13, 312, 308, 317, 14, 87,
)
_AUX_BODY_FILE = "body_pose_model.pth"

_lock = threading.Lock()
_mp_detectors: dict[bool, tuple[object, threading.Lock]] = {}
_aux_detectors: dict[str, object | None] = {}


def no_person_error() -> UserInputError:
    return UserInputError(
        "No person was found in the pose reference image. Use a photo where one person is clearly "
        "visible, pick a pose preset (pose_preset=...), or pass a ready OpenPose skeleton image with "
        "preprocess=false.")


# ------------------------------------------------------------------------------------------ MediaPipe
@functools.lru_cache(maxsize=1)  # a failed import is not cached: installing mediapipe later works
def _import_mediapipe():
    # mediapipe 0.10.21's bindings print a harmless complaint about newer protobuf ("MessageFactory ... GetPrototype")
    # while importing; keep it out of the server log. Real import failures still raise.
    # (redirect_stderr swaps sys.stderr process-wide, but only for this one-time import.)
    os.environ.setdefault("GLOG_minloglevel", "2")
    with contextlib.redirect_stderr(io.StringIO()):
        import mediapipe as mp
    return mp


def mediapipe_available() -> bool:
    try:
        return hasattr(_import_mediapipe(), "solutions")
    except Exception:  # any import problem (missing, protobuf clash, ...) means "not available"
        return False


def _mp_detector(holistic: bool) -> tuple[object, threading.Lock]:
    """One graph per kind, built on first use. MediaPipe graphs are not thread-safe: each has a lock."""
    with _lock:
        if holistic not in _mp_detectors:
            solutions = _import_mediapipe().solutions
            # model_complexity=1: complexity 2 ("heavy") is not in the wheel and would be downloaded.
            with routine_native_logs_dropped():
                if holistic:
                    graph = solutions.holistic.Holistic(static_image_mode=True, model_complexity=1,
                                                        refine_face_landmarks=False)
                else:
                    graph = solutions.pose.Pose(static_image_mode=True, model_complexity=1)
            _mp_detectors[holistic] = (graph, threading.Lock())
        return _mp_detectors[holistic]


def _mp_body(landmarks) -> list[tuple[float, float] | None]:
    body: list[tuple[float, float] | None] = [None] * 18
    for op_i, mp_i in _MP_BODY.items():
        lm = landmarks[mp_i]
        if lm.visibility >= MIN_VISIBILITY and 0.0 <= lm.x <= 1.0 and 0.0 <= lm.y <= 1.0:
            body[op_i] = (lm.x, lm.y)
    if body[2] is not None and body[5] is not None:
        body[1] = ((body[2][0] + body[5][0]) / 2, (body[2][1] + body[5][1]) / 2)
    return body


def _mp_points(landmark_list, indices=None) -> list[tuple[float, float] | None] | None:
    if landmark_list is None:
        return None
    lms = landmark_list.landmark
    return [(lms[i].x, lms[i].y) for i in (indices if indices is not None else range(len(lms)))]


def _mp_face(landmark_list) -> list[tuple[float, float] | None] | None:
    face = _mp_points(landmark_list, _MP_FACE_68)
    if face is None:
        return None
    # OpenPose's points 68/69 are the pupils: the centres of the two eye outlines (points 36-41, 42-47).
    for lo in (36, 42):
        eye = np.array(face[lo:lo + 6])
        face.append(tuple(eye.mean(axis=0)))
    return face


def detect_mediapipe(rgb: np.ndarray, *, hands: bool, face: bool) -> list[PoseKeypoints]:
    holistic = hands or face  # Holistic adds hand and face models; plain Pose is faster when unneeded
    graph, graph_lock = _mp_detector(holistic)
    with graph_lock, routine_native_logs_dropped():
        result = graph.process(rgb)
    if result.pose_landmarks is None:
        return []
    person = PoseKeypoints(_mp_body(result.pose_landmarks.landmark))
    if hands:
        person.left_hand = _mp_points(result.left_hand_landmarks)  # same 21-point order as OpenPose
        person.right_hand = _mp_points(result.right_hand_landmarks)
    if face:
        person.face = _mp_face(result.face_landmarks)
    return [person]


# ---------------------------------------------------------------------------------- controlnet_aux
def _aux_detector(annotator_dir: str):
    """controlnet_aux OpenposeDetector from a local folder, or None when it cannot be used here."""
    key = str(Path(annotator_dir).expanduser().resolve())
    with _lock:
        if key not in _aux_detectors:
            _aux_detectors[key] = None
            if not (Path(key) / _AUX_BODY_FILE).is_file():
                log.warning("pose annotator folder %s has no %s; using MediaPipe", key, _AUX_BODY_FILE)
            else:
                try:
                    from controlnet_aux import OpenposeDetector  # optional; needs torchvision

                    # A folder path makes from_pretrained read local files (no hub access).
                    _aux_detectors[key] = OpenposeDetector.from_pretrained(key)
                except Exception as exc:  # ImportError, torchvision operator errors, bad weights: all mean skip
                    log.warning("controlnet_aux OpenPose unusable (%s: %s); using MediaPipe",
                                type(exc).__name__, exc)
        return _aux_detectors[key]


def _aux_points(points) -> list[tuple[float, float] | None] | None:
    if points is None:
        return None
    # controlnet_aux marks missing hand/face points with negative coordinates.
    return [None if p is None or p.x < 0 or p.y < 0 else (float(p.x), float(p.y)) for p in points]


def detect_controlnet_aux(detector, rgb: np.ndarray, *, hands: bool, face: bool) -> list[PoseKeypoints]:
    poses = detector.detect_poses(rgb, include_hand=hands, include_face=face)  # expects RGB, returns 0..1
    return [PoseKeypoints(_aux_points(p.body.keypoints), _aux_points(p.left_hand),
                          _aux_points(p.right_hand), _aux_points(p.face)) for p in poses]


# ---------------------------------------------------------------------------------------- entry point
def detect_pose(image: Image.Image, *, hands: bool = False, face: bool = False,
                backend: PoseBackend = "auto", annotator_dir: str | None = None) -> list[PoseKeypoints]:
    """People in `image` as OpenPose keypoints normalized to the image; UserInputError if none."""
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    if backend not in ("auto", "mediapipe", "controlnet_aux"):
        raise UserInputError(f"pose backend must be auto, mediapipe or controlnet_aux, got {backend!r}")
    detector = _aux_detector(annotator_dir) if annotator_dir and backend != "mediapipe" else None
    if backend == "controlnet_aux" and detector is None:
        raise UserInputError(
            "The controlnet_aux pose backend needs controlnet_aux (with torchvision) and its OpenPose "
            f"weights ({_AUX_BODY_FILE}, hand_pose_model.pth, facenet.pth) in the configured annotator "
            "folder; use the mediapipe backend instead, or pass a ready pose map with preprocess=false.")
    if detector is not None:
        people = detect_controlnet_aux(detector, rgb, hands=hands, face=face)
    elif mediapipe_available():
        people = detect_mediapipe(rgb, hands=hands, face=face)
    else:
        raise UserInputError(
            "No pose detector is installed on the server (mediapipe==0.10.21, installed with --no-deps, "
            "or controlnet_aux with local weights). Pick a pose preset, or pass a ready OpenPose "
            "skeleton image with preprocess=false.")
    people = [p for p in people if p.visible_count() >= MIN_BODY_POINTS]
    if not people:
        raise no_person_error()
    return people
