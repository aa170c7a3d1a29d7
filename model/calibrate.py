"""`fashionbert calibrate`: fit the rerank's cross-encoder weight on products a run never trained on.

The demo pipeline renders a small second demo catalog with another seed (the same generator, other
products) and fits on it; with a catalog of your own, hold out products of your own. See
runtime/scoring.py for what the weight is and why it is fitted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from .evaluate import read_split
from .fashionbert import load_model
from .features import resolve_precision
from .train import calibrate_rerank

log = logging.getLogger(__name__)


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
