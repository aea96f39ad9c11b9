"""Face-identity consistency: score images against a character's reference face embeddings.

    checker = ConsistencyChecker(load_yaml_model(path, ConsistencyConfig), models_root)
    refs = checker.references_for("luca", preset_paths=preset.reference_embeddings)
    scores = checker.score(images, refs, checker.resolve_threshold(preset_threshold=preset.consistency_threshold))
    ranking = rank_candidates(scores)
"""

from mcp_sdxl.consistency.checker import ConsistencyChecker
from mcp_sdxl.consistency.faces import open_image
from mcp_sdxl.consistency.results import CandidateRanking, FaceScore, RankedCandidate, rank_candidates

__all__ = [
    "CandidateRanking",
    "ConsistencyChecker",
    "FaceScore",
    "RankedCandidate",
    "open_image",
    "rank_candidates",
]
