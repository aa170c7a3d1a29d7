"""The rerank weight: fitted on held-out training products, by mean reciprocal rank."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fashionbert.runtime.scoring import GRID, cross_weight, fit_cross_weight, reciprocal_ranks
from fashionbert.model.calibrate import calibration_products
from fashionbert.model.config import TrainConfig


def test_reciprocal_ranks_by_hand():
    scores = np.array([[0.9, 0.5, 0.1], [0.2, 0.8, 0.3], [0.5, 0.5, 0.5], [1.0, 2.0, 3.0]])
    hit = np.array([[False, True, False], [False, True, False], [False, False, True], [False, False, False]])
    # second place; first place; a tie keeps the recall order, so third; no true candidate.
    np.testing.assert_allclose(reciprocal_ranks(scores, hit), [1 / 2, 1, 1 / 3, 0])


def synthetic(queries=400, k=20, cross_signal=1.0, seed=0):
    """Towers that find the true candidate often but not always; a cross-encoder with its own, independent evidence."""
    rng = np.random.default_rng(seed)
    hit = np.zeros((queries, k), bool)
    hit[np.arange(queries), rng.integers(0, k, queries)] = True
    tower = rng.normal(size=(queries, k)) + 2.0 * hit
    cross = rng.normal(size=(queries, k)) * 2 + cross_signal * 2.0 * hit
    return cross, tower, hit


def test_a_cross_encoder_with_its_own_evidence_gets_weight_and_ranks_better():
    cross, tower, hit = synthetic()
    weight, mrr = fit_cross_weight(cross, tower, hit)
    assert 0.2 <= weight <= 1.5 and set(mrr) == set(GRID)
    assert mrr[weight] > mrr[0.0] + 0.05  # better than the towers' order alone
    first = lambda s, h: np.mean(reciprocal_ranks(s, h) == 1)  # noqa: E731
    assert first(weight * cross + tower, hit) > first(tower, hit)
    fresh_cross, fresh_tower, fresh_hit = synthetic(seed=1)  # and the weight carries over to unseen queries
    assert first(weight * fresh_cross + fresh_tower, fresh_hit) > first(fresh_tower, fresh_hit)


def test_a_cross_encoder_that_knows_nothing_gets_little_or_no_weight():
    cross, tower, hit = synthetic(cross_signal=0.0)
    weight, mrr = fit_cross_weight(cross, tower, hit)
    assert weight <= 0.1 and mrr[weight] - mrr[0.0] < 0.01
    assert fit_cross_weight(np.zeros_like(tower), tower, hit)[0] == 0.0  # every weight ties: the smallest


def test_bad_shapes_and_old_models():
    cross, tower, hit = synthetic(queries=5)
    with pytest.raises(ValueError, match="shape"):
        fit_cross_weight(cross[:, :3], tower, hit)
    with pytest.raises(ValueError, match="no queries"):
        fit_cross_weight(cross[:0], tower[:0], hit[:0])
    assert cross_weight({}) == 1.0 and cross_weight({"rerank": {"cross_weight": 0.35}}) == 0.35


def fake_catalog(products: int):
    records = [SimpleNamespace(product_id=f"p{i // 2}") for i in range(2 * products)]  # two images each
    return SimpleNamespace(records=lambda split: records if split == "train" else [])


def test_held_out_products_are_a_tenth_at_most_and_none_for_small_catalogs():
    held = calibration_products(fake_catalog(1000), TrainConfig(calibration_products=400, seed=3))
    assert len(held) == 100 and held <= {f"p{i}" for i in range(1000)}
    assert held == calibration_products(fake_catalog(1000), TrainConfig(calibration_products=400, seed=3))  # a resume agrees
    assert len(calibration_products(fake_catalog(10_000), TrainConfig(calibration_products=400))) == 400
    assert calibration_products(fake_catalog(150), TrainConfig(calibration_products=400)) == frozenset()  # 15: too few
    assert calibration_products(fake_catalog(10_000), TrainConfig()) == frozenset()  # off by default
