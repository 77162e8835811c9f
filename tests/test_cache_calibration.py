"""The semantic cache's cosine floor derived from the operator's error budget, and rendered into the front model."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format
from support import make_artifacts
from tritonclient.grpc import model_config_pb2 as mc

from tritonllm.builders.cache_calibration import (THRESHOLDS, lowest_threshold_within, resolve_threshold, served_at,
                                                  threshold_table)
from tritonllm.builders.model_config import LLM
from tritonllm.builders.repository import render_repository
from tritonllm.contract import CacheSettings, RepositorySettings, SettingsError, read_parameters


def test_derived_floor_is_the_lowest_whose_higher_floors_all_keep_the_budget():
    # 100 right hits spread over 0.55..0.99; wrong ones (verifier accepted) at 0.60, 0.70 and 0.72; one wrong pair
    # the verifier refused at 0.95 never counts
    right = np.linspace(0.55, 0.99, 100)
    cosine = np.concatenate([right, [0.60, 0.70, 0.72, 0.95]])
    should_hit = np.array([True] * 100 + [False] * 4)
    accepted = np.array([True] * 103 + [False])
    scores = (cosine, should_hit, accepted)
    for budget in (0.005, 0.02, 0.5):
        floor = lowest_threshold_within(threshold_table(scores), budget)
        assert all(served_at(scores, higher)["false_hit_rate"] <= budget for higher in THRESHOLDS if higher >= floor)
        lower = [threshold for threshold in THRESHOLDS if threshold < floor]
        assert not lower or served_at(scores, lower[-1])["false_hit_rate"] > budget
    assert lowest_threshold_within(threshold_table(scores), 0.005) == 0.73  # above every accepted wrong hit
    assert lowest_threshold_within(threshold_table(scores), 0.5) == THRESHOLDS[0]


def test_max_false_hit_rate_is_validated():
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(SettingsError, match="max_false_hit_rate"):
            CacheSettings(max_false_hit_rate=bad).validate()


def test_rendered_front_model_carries_the_derived_floor_unless_the_operator_set_one(embedder_dir, tmp_path):
    artifacts = {**make_artifacts(tmp_path / "build"), "embedder_dir": embedder_dir}
    _, derived = resolve_threshold(CacheSettings(max_false_hit_rate=0.01), embedder_dir)  # stored: render reuses it
    assert derived.false_hit_rate <= 0.01 and derived.similarity_threshold > 0 and derived.pairs > 500

    def rendered_parameters(cache: CacheSettings, name: str) -> dict[str, str]:
        repository = render_repository(RepositorySettings(**artifacts, cache=cache), tmp_path / name)
        config = text_format.Parse((repository / LLM / "config.pbtxt").read_text(), mc.ModelConfig())
        return read_parameters(config)

    assert float(rendered_parameters(CacheSettings(), "derived")["similarity_threshold"]) == \
        derived.similarity_threshold
    assert rendered_parameters(CacheSettings(similarity_threshold=0.93), "fixed")["similarity_threshold"] == "0.93"
