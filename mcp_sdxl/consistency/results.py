"""Result models (JSON-ready through .model_dump()) and candidate ranking."""

from __future__ import annotations

from pydantic import BaseModel, Field


class FaceScore(BaseModel):
    """Identity score of one image against a character's references.

    When several faces are detected, the largest one is scored (the subject of a character
    portrait; smaller faces are usually background people). No face is a normal result:
    face_found False, similarities None, is_match False.
    """

    index: int = Field(description="position of the image in the scored list")
    face_found: bool
    faces_detected: int = 0
    face_box: tuple[float, float, float, float] | None = Field(default=None, description="x, y, width, height")
    similarity_best: float | None = Field(default=None, description="highest cosine similarity over the references")
    similarity_mean: float | None = Field(default=None, description="mean cosine similarity over the references")
    similarity: float | None = Field(default=None, description="the value compared with the threshold")
    aggregation: str = Field(description="best | mean: which similarity decides is_match")
    is_match: bool
    threshold: float
    backend: str
    references: int = Field(description="number of reference embeddings compared")


class RankedCandidate(BaseModel):
    rank: int = Field(description="1 = best")
    index: int
    passed: bool = Field(description="False marks a candidate below the threshold (or with no face)")
    similarity: float | None
    score: FaceScore


class CandidateRanking(BaseModel):
    candidates: list[RankedCandidate] = Field(description="best first; the best comes first even if none passed")
    any_passed: bool
    best_index: int | None = Field(description="index of the best candidate in the input list")
    passed_indices: list[int] = Field(description="input indices that passed, best first")


def rank_candidates(scores: list[FaceScore]) -> CandidateRanking:
    """Order candidates best first: passed before failed, then higher similarity, then input order.

    Images without a face sort last. Nothing is dropped, so a caller that must return one image
    still gets the closest one when none passed (any_passed tells it the result is below threshold).
    """

    def key(s: FaceScore) -> tuple[bool, float, int]:
        sim = s.similarity if s.similarity is not None else float("-inf")
        return (not s.is_match, -sim, s.index)

    ordered = sorted(scores, key=key)
    ranked = [
        RankedCandidate(rank=i + 1, index=s.index, passed=s.is_match, similarity=s.similarity, score=s)
        for i, s in enumerate(ordered)
    ]
    passed = [c.index for c in ranked if c.passed]
    return CandidateRanking(
        candidates=ranked,
        any_passed=bool(passed),
        best_index=ranked[0].index if ranked else None,
        passed_indices=passed,
    )
