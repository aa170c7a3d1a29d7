"""`fashionbert calibrate`: fit the rerank's cross-encoder weight on products a run never trained on.

The demo pipeline renders a small second demo catalog with another seed (the same generator, other
products) and fits on it; with a catalog of your own, hold out products of your own, or let
training hold some out (`calibration_products`: training fits the weight on them at its end). See
runtime/scoring.py for what the weight is and why it is fitted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_text
from .config import TrainConfig
from .data import SplitData
from .evaluate import read_split
from .fashionbert import FashionBert, load_model
from .features import resolve_precision
from .pair_scorer import PairScorer
from ..runtime.scoring import fit_cross_weight, fused_scores, reciprocal_ranks

log = logging.getLogger(__name__)


def calibration_products(catalog, cfg: TrainConfig) -> frozenset[str]:
    """The training products held out to fit the rerank weight: a seeded draw, the same on a resume."""
    products = list(dict.fromkeys(r.product_id for r in catalog.records("train")))
    n = min(cfg.calibration_products, len(products) // 10)
    if n < 20:
        if cfg.calibration_products:
            log.info("Only %d training products: none held out to fit the rerank weight (it stays 1).", len(products))
        return frozenset()
    return frozenset(products[i] for i in np.random.default_rng([cfg.seed, 11]).choice(len(products), n, replace=False))


def calibrate_rerank(run: Path, model: FashionBert, meta: dict, data: SplitData, rerank_k: int, device: torch.device,
                     autocast, source: str = "held-out training products") -> dict:
    """Fit the rerank's cross-encoder weight on products the model never trained on (`data`), with
    the run's best model (`model` and `meta`, as loaded from RUN/model), and record it in that
    config.json, where evaluation and export read it."""
    model.to(device)
    k = min(rerank_k, len(data))
    with autocast():
        scorer = PairScorer(model, data)
        sim = scorer.similarity()
        top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        cross = scorer.logits(np.repeat(np.arange(len(data)), k), top.reshape(-1)).reshape(len(data), k)
    cosines, scale = np.take_along_axis(sim, top, 1), float(model.itc.scale().detach())
    tower = scale * cosines  # the two-tower logit
    hit = data.product[top] == data.product[:, None]
    weight, mrr = fit_cross_weight(cross, tower, hit)
    first = lambda scores: float(np.mean(reciprocal_ranks(scores, hit) == 1.0))  # noqa: E731
    rerank = {"cross_weight": weight, "fitted_on": len(data), "source": source, "K": k,
              "criterion": "mean reciprocal rank in the top K",
              "R@1_two_tower": first(tower), "R@1_fitted": first(fused_scores(cross, cosines, scale, weight)),
              "R@1_weight_1": first(fused_scores(cross, cosines, scale)),
              "mrr_by_weight": {str(w): round(v, 5) for w, v in mrr.items()}}
    write_text(run / "model" / "config.json", json.dumps({**meta, "rerank": rerank}, indent=2))
    log.info("Rerank weight on the cross-encoder logit: %.2f, fitted on %d %s "
             "(their R@1 in a top %d: two-tower %.3f, reranked %.3f; with weight 1: %.3f).", weight, len(data), source, k,
             rerank["R@1_two_tower"], rerank["R@1_fitted"], rerank["R@1_weight_1"])
    return rerank


def calibrate(run: str | Path, catalog_path: str | Path, split: str = "all", features_path: str | Path | None = None,
              rerank_k: int = 20, device: str = "cpu", precision: str = "auto", progress: bool = True) -> dict:
    run, catalog_path = Path(run), Path(catalog_path)
    if rerank_k < 2:
        raise ValueError("--rerank-k must be at least 2")
    model, meta = load_model(run / "model")  # a clear error when the run has no trained model
    trained_on = json.loads((run / "summary.json").read_text()).get("catalog") if (run / "summary.json").is_file() else None
    if trained_on and Path(trained_on).resolve() == catalog_path.resolve():
        if split in ("train", "all"):
            raise ValueError(f"{run} was trained on the train split of {catalog_path}: fit the weight on products it "
                             "never saw (another catalog, or --split validation, which then no longer measures it fairly)")
        log.warning("Fitting on %s's %s split: evaluations on that split will flatter the rerank.", catalog_path, split)
    mode = meta.get("train", {}).get("feature_mode", "grid")
    # Its own feature file: demo catalogs drawn with other seeds reuse item ids, and a shared file would mix them.
    features_path = Path(features_path) if features_path else run / f"calibration-{mode}.h5"
    data = read_split(model, run, catalog_path, split, features_path, mode, progress)
    products = len(np.unique(data.product))
    if products < 20:
        raise ValueError(f"{catalog_path} ({split}) has {products} products with features: fitting the weight needs at least 20")
    dev = torch.device(device)
    bf16 = resolve_precision(precision, dev) == "bf16"
    autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    return calibrate_rerank(run, model, meta, data, rerank_k, dev, autocast, source=f"products of {catalog_path} ({split})")
