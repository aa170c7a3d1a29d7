"""The rerank's scores: the fused ordering score, the match probability, and the one fitted number
in them, how much the cross-encoder's logit counts against the towers'.

The service orders the top K by `cross_weight * cross-encoder logit + two-tower logit`. Training
teaches the cross-encoder to correct the towers with the weight at 1, but on products it has never
seen its corrections are noisier than on the ones it trained on, so 1 trusts it too much (on the
demo catalog's validation split a weight of 1 ranked below the towers alone at R@1,
docs/results-history.md). So the weight is fitted on products the run never trained on: `fashionbert calibrate`
on a catalog of them (model/calibrate.py), or training's own held-out products
(`calibration_products`); evaluation data is never used for it.

The criterion is the mean reciprocal rank of the true product within the top K: like R@1 it rewards
the first place most, but it moves more smoothly with the weight, so a few hundred queries can fit it.
"""

from __future__ import annotations

import numpy as np

GRID = tuple(round(0.05 * i, 2) for i in range(41))  # 0, 0.05, ..., 2.0


def reciprocal_ranks(scores: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """Per query (row), 1 / rank of its first true candidate when the row is sorted by `scores`
    (0 when no candidate is true). Ties are broken by the candidates' order (the recall order)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(hit, order, axis=1)
    first = ranked.argmax(1)
    return np.where(ranked.any(1), 1.0 / (first + 1), 0.0)


def fit_cross_weight(cross_logits: np.ndarray, tower_logits: np.ndarray, hit: np.ndarray,
                     grid: tuple[float, ...] = GRID) -> tuple[float, dict[float, float]]:
    """The weight of the grid with the best mean reciprocal rank (the smallest of equals: a cross-encoder
    that adds nothing gets 0, the recall order), and the mean reciprocal rank of each weight.

    All three arrays are (queries, K): candidate j of query i, in recall order; `hit` marks the true ones.
    """
    if not (cross_logits.shape == tower_logits.shape == hit.shape) or cross_logits.ndim != 2:
        raise ValueError("cross_logits, tower_logits and hit must share one (queries, K) shape")
    if not len(hit):
        raise ValueError("no queries to fit the rerank weight on")
    mrr = {w: float(reciprocal_ranks(fused_scores(cross_logits, tower_logits, 1.0, w), hit).mean()) for w in grid}
    best = max(mrr.values())
    return next(w for w in grid if mrr[w] >= best - 1e-12), mrr


def cross_weight(meta: dict) -> float:
    """The fitted weight recorded in a trained model's config.json; 1 for models trained before it was fitted."""
    return float(meta.get("rerank", {}).get("cross_weight", 1.0))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def fused_scores(cross_logits: np.ndarray, tower_cosines: np.ndarray, itc_scale: float, weight: float = 1.0) -> np.ndarray:
    """The rerank's ordering score: the weighted cross-encoder logit plus the two-tower logit (the
    towers' learned inverse temperature times the cosine). Any shape, elementwise."""
    return weight * np.asarray(cross_logits) + itc_scale * np.asarray(tower_cosines)
