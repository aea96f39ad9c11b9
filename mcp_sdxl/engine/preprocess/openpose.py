"""The OpenPose skeleton format that SDXL openpose ControlNets were trained on, and its renderer.

Layout and colours follow controlnet_aux's `draw_bodypose` / `draw_handpose` / `draw_facepose` (the
ControlNet 1.1 annotator): 18 COCO body points, one fixed colour per limb (drawn at 60 % brightness) and
per joint, hands as 21-point rainbow skeletons with blue joints, the face as 70 white dots. The
ControlNets learned those exact colours (they tell left from right), so they must not be changed.
controlnet_aux draws at 512 px and resizes; we draw at the target size with widths scaled the same way.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

Point = tuple[float, float]  # normalized (x, y): 0..1 across the canvas, y downwards

# The 18 OpenPose body points (COCO order). "right" is the person's right: image left when facing you.
BODY_POINTS: tuple[str, ...] = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)

# Limbs as 1-based point pairs in OpenPose/controlnet_aux order; limb i is drawn in COLORS[i].
LIMBS: tuple[tuple[int, int], ...] = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
    (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
)
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
HAND_EDGES: tuple[tuple[int, int], ...] = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)
REFERENCE_SIZE = 512  # the resolution controlnet_aux draws at; line widths scale from it
_EPS = 0.01  # controlnet_aux skips hand/face points at ~0 (its "not detected" marker)


@dataclass
class PoseKeypoints:
    """One person: 18 body points (None = not visible), optional 21-point hands and 70-point face."""

    body: list[Point | None]
    left_hand: list[Point | None] | None = None
    right_hand: list[Point | None] | None = None
    face: list[Point | None] | None = field(default=None)

    def point(self, name: str) -> Point | None:
        return self.body[BODY_POINTS.index(name)]

    def visible_count(self) -> int:
        return sum(p is not None for p in self.body)

    def mapped(self, fn) -> PoseKeypoints:
        """Copy with every point passed through fn((x, y)) -> (x, y)."""
        def conv(points):
            return None if points is None else [None if p is None else fn(p) for p in points]
        return PoseKeypoints(conv(self.body), conv(self.left_hand), conv(self.right_hand), conv(self.face))


def _px(p: Point, width: int, height: int) -> tuple[int, int]:
    return int(p[0] * width), int(p[1] * height)


def _draw_body(canvas: np.ndarray, body: list[Point | None], scale: float) -> None:
    h, w = canvas.shape[:2]
    stick = max(1, round(4 * scale))
    for (a, b), color in zip(LIMBS, COLORS, strict=False):  # 17 limbs, 18 colours
        p1, p2 = body[a - 1], body[b - 1]
        if p1 is None or p2 is None:
            continue
        x1, y1 = p1[0] * w, p1[1] * h
        x2, y2 = p2[0] * w, p2[1] * h
        length = math.hypot(x1 - x2, y1 - y2)
        angle = math.degrees(math.atan2(y1 - y2, x1 - x2))
        poly = cv2.ellipse2Poly((int((x1 + x2) / 2), int((y1 + y2) / 2)), (int(length / 2), stick),
                                int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, poly, [int(c * 0.6) for c in color])
    for p, color in zip(body, COLORS, strict=True):
        if p is not None:
            cv2.circle(canvas, _px(p, w, h), max(1, round(4 * scale)), color, thickness=-1)


def _draw_hand(canvas: np.ndarray, hand: list[Point | None], scale: float) -> None:
    h, w = canvas.shape[:2]
    for i, (a, b) in enumerate(HAND_EDGES):
        p1, p2 = hand[a], hand[b]
        if p1 is None or p2 is None or min(*p1, *p2) <= _EPS:
            continue
        rgb = colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0)
        cv2.line(canvas, _px(p1, w, h), _px(p2, w, h), [int(c * 255) for c in rgb],
                 thickness=max(1, round(2 * scale)))
    for p in hand:
        if p is not None and min(p) > _EPS:
            cv2.circle(canvas, _px(p, w, h), max(1, round(4 * scale)), (0, 0, 255), thickness=-1)


def _draw_face(canvas: np.ndarray, face: list[Point | None], scale: float) -> None:
    h, w = canvas.shape[:2]
    for p in face:
        if p is not None and min(p) > _EPS:
            cv2.circle(canvas, _px(p, w, h), max(1, round(3 * scale)), (255, 255, 255), thickness=-1)


def render_openpose(people: list[PoseKeypoints], width: int, height: int, *,
                    hands: bool = True, face: bool = True) -> Image.Image:
    """Draw `people` (canvas-normalized points) on a black RGB (width, height) image."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    scale = min(width, height) / REFERENCE_SIZE
    for person in people:
        _draw_body(canvas, person.body, scale)
        if hands:
            for hand in (person.left_hand, person.right_hand):
                if hand:
                    _draw_hand(canvas, hand, scale)
        if face and person.face:
            _draw_face(canvas, person.face, scale)
    return Image.fromarray(canvas)
