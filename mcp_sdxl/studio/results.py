"""What the studio returns: pydantic models that the MCP server also publishes as output schemas."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class LoraUsed(BaseModel):
    kind: Literal["character", "background", "style"]
    name: str
    weight: float
    trigger_words: list[str] = Field(default_factory=list)


class ControlUsed(BaseModel):
    type: Literal["openpose", "depth", "canny"]
    strength: float
    source: str = Field(description="input path, image id, or pose preset name")
    preprocessed: bool
    control_image_id: str | None = Field(None, description="id of the control map in the store (what steered)")


class FaceCheck(BaseModel):
    face_found: bool
    similarity: float | None = None
    similarity_best: float | None = None
    similarity_mean: float | None = None
    is_match: bool
    threshold: float
    backend: str
    rank: int | None = Field(None, description="1 = best candidate")


class ImageInfo(BaseModel):
    id: str = Field(description="store id; pass it to other tools (e.g. score_consistency, generate_with_control)")
    uri: str = Field(description="MCP resource with the full PNG")
    path: str = Field(description="file on the server's disk")
    width: int
    height: int
    seed: int | None = None
    consistency: FaceCheck | None = None


class GenerationResult(BaseModel):
    status: Literal["done", "queued", "running", "failed", "cancelled"] = "done"
    job_id: str | None = Field(None, description="poll with get_job; set when the call runs as a background job")
    images: list[ImageInfo] = Field(default_factory=list, description="best first when consistency filtering ran")
    control_images: list[ImageInfo] = Field(default_factory=list, description="the control maps used")
    character: str | None = None
    prompt: str = ""
    negative_prompt: str = ""
    loras: list[LoraUsed] = Field(default_factory=list)
    controls: list[ControlUsed] = Field(default_factory=list)
    quality: str | None = None
    steps: int = 0
    cfg_scale: float = 0.0
    scheduler: str = ""
    width: int = 0
    height: int = 0
    profile: str = Field("", description="engine profile that made the images: sdxl or tiny (random weights)")
    model: str = ""
    consistency_summary: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    estimated_seconds: float | None = None
    message: str = ""
    notes: list[str] = Field(default_factory=list, description="parts of the request that had no effect")
    source_image: str | None = Field(None, description="edit_image / upscale_image: the image it started from")
    mask_image: str | None = Field(None, description="inpainting: the mask (white was repainted)")
    strength: float | None = Field(None, description="how much of the source was repainted (0 = unchanged)")
    upscale_factor: int | None = None
    regenerated_from: str | None = Field(None, description="regenerate: the image whose request was re-run")


class JobInfo(BaseModel):
    job_id: str
    kind: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: dict[str, Any] | None = None
    error: str | None = None
    ahead: int = 0
    result: GenerationResult | None = None
    message: str = ""
