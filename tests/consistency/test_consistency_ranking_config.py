"""Candidate ranking (pure) and the config file."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_sdxl.config.consistency import ConsistencyConfig
from mcp_sdxl.config.loader import load_yaml_model
from mcp_sdxl.consistency import FaceScore, rank_candidates
from mcp_sdxl.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _score(index: int, similarity: float | None, threshold: float = 0.5) -> FaceScore:
    found = similarity is not None
    return FaceScore(
        index=index, face_found=found, faces_detected=int(found), similarity_best=similarity,
        similarity_mean=similarity, similarity=similarity, aggregation="best",
        is_match=found and similarity >= threshold, threshold=threshold, backend="sface", references=1,
    )


def test_orders_best_first_and_marks_failures():
    ranking = rank_candidates([_score(0, 0.4), _score(1, 0.9), _score(2, None), _score(3, 0.6)])
    assert [c.index for c in ranking.candidates] == [1, 3, 0, 2]
    assert [c.rank for c in ranking.candidates] == [1, 2, 3, 4]
    assert [c.passed for c in ranking.candidates] == [True, True, False, False]
    assert ranking.any_passed and ranking.best_index == 1 and ranking.passed_indices == [1, 3]


def test_best_is_first_even_when_none_passes():
    ranking = rank_candidates([_score(0, 0.1), _score(1, 0.3), _score(2, None)])
    assert not ranking.any_passed and ranking.passed_indices == []
    assert ranking.best_index == 1 and not ranking.candidates[0].passed


def test_empty_and_json_ready():
    assert rank_candidates([]).model_dump() == {
        "candidates": [], "any_passed": False, "best_index": None, "passed_indices": []}
    dumped = rank_candidates([_score(0, 0.7)]).model_dump(mode="json")
    assert dumped["candidates"][0]["score"]["backend"] == "sface"


@given(st.lists(st.one_of(st.none(), st.floats(-1, 1)), max_size=12), st.floats(0, 1))
def test_ranking_properties(sims, threshold):
    scores = [_score(i, s, threshold) for i, s in enumerate(sims)]
    ranking = rank_candidates(scores)
    assert sorted(c.index for c in ranking.candidates) == list(range(len(sims)))  # nothing dropped
    passed = [c.passed for c in ranking.candidates]
    assert passed == sorted(passed, reverse=True)  # all passes come before all failures
    assert ranking.any_passed == any(passed)
    found = [c.similarity for c in ranking.candidates if c.similarity is not None]
    if not ranking.any_passed:
        assert found == sorted(found, reverse=True)
        assert all(c.similarity is None for c in ranking.candidates[len(found):])  # no-face last


def test_shipped_yaml_matches_defaults():
    cfg = load_yaml_model(REPO / "configs" / "consistency.yaml", ConsistencyConfig)
    assert cfg == ConsistencyConfig()
    assert (cfg.backend, cfg.thresholds.arcface, cfg.thresholds.sface) == ("auto", 0.65, 0.363)
    assert cfg.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize("text, key", [
    ("thresholds: {sface: 1.5}", "thresholds.sface"),
    ("backend: facenet", "backend"),
    ("aggregation: median", "aggregation"),
    ("treshold: 0.6", "treshold"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    path = tmp_path / "consistency.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_yaml_model(path, ConsistencyConfig)
