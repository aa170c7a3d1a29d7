"""`fashionbert eval`: the paper's protocol, text-image matching, and full-gallery retrieval as the service does it;
and training's quick check after each epoch.

- Paper protocol (FashionBERT Table 1, model/protocol.py): each query (a caption, or an image)
  is ranked against its positive and `negatives` candidates of other products from the same
  subcategory (topped up from other subcategories when it has fewer), scored by the
  cross-encoder's match probability. Rank@1/5/10 for image->text and text->image; mean and
  spread over `draws` draws with fixed seeds.
- Matching: every validation product's true pair and one sampled same-subcategory negative;
  accuracy at probability 0.5 and AUC.
- Full gallery: each caption against every validation image. Two-tower only, then two-tower
  top-N reranked by the cross-encoder over the top K. The product (not the image) is the unit:
  any pose of the right product is a hit.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import write_text
from ..catalog.readers import open_catalog
from .config import TrainConfig
from .data import SplitData, ensure_features, first_row_per_product, load_split, negatives_by_subcategory
from ..runtime.feature_store import FeatureStore, default_features_path
from .features import resolve_precision
from .fashionbert import FashionBert, load_model
from .pair_scorer import PairScorer
from .protocol import paper_protocol, recall_at
from ..runtime.scoring import cross_weight, fused_scores
from ..runtime.tokenizer import CaptionTokenizer

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    split: str = "validation"
    queries: int = 100  # per direction and draw (the paper: 1,000)
    negatives: int = 100
    draws: int = 3
    gallery_queries: int = 400
    recall_n: int = 100
    rerank_k: int = 20
    precision: str = "auto"
    device: str = "cpu"
    seed: int = 0


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tie = scores == value
        ranks[tie] = ranks[tie].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def matching(score, data: SplitData, cfg: EvalConfig) -> dict:
    products = first_row_per_product(data.product)
    view = data.subset(products)
    rng = np.random.default_rng([cfg.seed, 99])
    negs = np.array([negatives_by_subcategory(view, i, 1, rng)[0] for i in range(len(products))])
    pos = score(products, products)
    neg = score(products, products[negs])
    accuracy = (np.mean(pos > 0.5) + np.mean(neg <= 0.5)) / 2 * 100
    return {"accuracy": float(accuracy), "auc": auc(pos, neg), "pairs": int(2 * len(products))}


def full_gallery(score, sim: np.ndarray, data: SplitData, cfg: EvalConfig, progress: bool = True,
                 itc_scale: float | None = None, cross_weight: float = 1.0) -> dict:
    """`sim`: two-tower similarity of every caption (row) to every image (column) of the split.

    With `itc_scale` (the towers' learned inverse temperature) a third pipeline is reported, the
    service's: the rerank orders the top K by cross_weight * cross-encoder logit + itc_scale *
    two-tower cosine, where cross_weight was fitted on products the model never trained on
    (runtime/scoring.py), never on evaluation data.
    """
    products = first_row_per_product(data.product)
    rng = np.random.default_rng([cfg.seed, 42])
    queries = np.sort(rng.choice(products, min(cfg.gallery_queries, len(products)), replace=False))
    two_tower, reranked, fused = [], [], []
    for q in tqdm(queries, desc="Full-gallery rerank", unit="query", disable=not progress, mininterval=1.0):
        order = np.argsort(-sim[q], kind="stable")[: cfg.recall_n]
        two_tower.append(_first_hit(order, data.product, data.product[q]))
        top = order[: cfg.rerank_k]
        if hasattr(score, "logits"):  # a PairScorer: its exact logits (a probability saturates near 1)
            logits = score.logits(np.full(len(top), q), top)
        else:
            p = np.clip(score(np.full(len(top), q), top).astype(np.float64), 1e-12, 1 - 1e-12)
            logits = np.log(p / (1 - p))
        new_order = np.concatenate([top[np.argsort(-logits, kind="stable")], order[cfg.rerank_k :]])
        reranked.append(_first_hit(new_order, data.product, data.product[q]))
        if itc_scale is not None:
            combined = fused_scores(logits, sim[q, top], itc_scale, cross_weight)
            fused.append(_first_hit(np.concatenate([top[np.argsort(-combined, kind="stable")], order[cfg.rerank_k :]]),
                                    data.product, data.product[q]))
    i2t_sim = sim.T
    i2t = [_first_hit(np.argsort(-i2t_sim[q], kind="stable")[: cfg.recall_n], data.product, data.product[q]) for q in queries]
    out = {"queries": int(len(queries)), "gallery": int(len(data)), "N": cfg.recall_n, "K": cfg.rerank_k,
           "two_tower_t2i": recall_at(two_tower), "reranked_t2i": recall_at(reranked), "two_tower_i2t": recall_at(i2t)}
    if fused:
        out["fused_t2i"] = recall_at(fused)
        out["cross_weight"] = cross_weight
    return out


def _first_hit(order: np.ndarray, product: np.ndarray, target: int) -> int:
    hits = np.flatnonzero(product[order] == target)
    return int(hits[0]) + 1 if len(hits) else 10**9


def quick_validation(model: FashionBert, data: SplitData, cfg: TrainConfig, autocast) -> dict[str, float]:
    """Training's check after each epoch: two-tower R@1 over the validation subset, and R@1 after
    reranking `cfg.val_queries` captions' top 10 the way the service does (cross-encoder logit +
    two-tower logit)."""
    model.eval()
    with autocast():
        scorer = PairScorer(model, data)
        sim = scorer.similarity()
        same = data.product[:, None] == data.product[None, :]
        best_true = np.where(same, sim, -np.inf).max(1)
        two_tower_r1 = float(np.mean((np.where(same, -np.inf, sim) < best_true[:, None]).all(1)))
        queries = np.random.default_rng(cfg.seed).choice(len(data), min(cfg.val_queries, len(data)), replace=False)
        itc_scale = float(model.itc.scale().detach())
        hits = 0
        for q in queries:
            top = np.argsort(-sim[q])[:10]
            scores = fused_scores(scorer.logits(np.full(len(top), q), top), sim[q, top], itc_scale)
            hits += bool(data.product[top[int(np.argmax(scores))]] == data.product[q])
    model.train()
    rerank_r1 = hits / len(queries)
    return {"two_tower_r1": two_tower_r1, "rerank_r1": rerank_r1, "score": (two_tower_r1 + rerank_r1) / 2}


def markdown(result: dict) -> str:
    p, m, g = result["paper_protocol"], result["matching"], result["full_gallery"]
    lines = [f"Split: {result['split']}; model: {result['run']}; {p['queries_per_draw']} queries per direction and draw, "
             f"{p['candidates']} candidates each (chance R@1 = {p['chance_R@1']:.2f}%), {len(p['t2i']['R@1']['draws'])} draws.",
             "", "| task | R@1 | R@5 | R@10 |", "| --- | ---: | ---: | ---: |"]
    for d, name in (("i2t", "Image → text (cross-encoder)"), ("t2i", "Text → image (cross-encoder)")):
        lines.append(f"| {name} | " + " | ".join(f"{p[d][k]['mean']:.2f} ± {p[d][k]['std']:.2f}" for k in ("R@1", "R@5", "R@10")) + " |")
    lines += ["", f"Text-image matching: accuracy {m['accuracy']:.2f}%, AUC {m['auc']:.3f} ({m['pairs']} pairs).", "",
              f"Full gallery ({g['queries']} caption queries against all {g['gallery']} validation images):", "",
              "| pipeline | R@1 | R@5 | R@10 |", "| --- | ---: | ---: | ---: |"]
    rows = [("two_tower_t2i", "two-tower only"), ("reranked_t2i", f"two-tower top {g['N']} → cross-encoder rerank of top {g['K']}")]
    if "fused_t2i" in g:
        w = g.get("cross_weight", 1.0)
        rows.append(("fused_t2i", f"same, reranked by {w:g} × cross-encoder logit + two-tower logit (the service's order)"))
    for key, name in rows:
        lines.append(f"| {name} | " + " | ".join(f"{g[key][k]:.2f}" for k in ("R@1", "R@5", "R@10")) + " |")
    lines.append("| image → text, two-tower only | " + " | ".join(f"{g['two_tower_i2t'][k]:.2f}" for k in ("R@1", "R@5", "R@10")) + " |")
    return "\n".join(lines) + "\n"


def read_split(model: FashionBert, run: Path, catalog_path: str | Path, split: str, features_path: Path, mode: str,
               progress: bool = True) -> SplitData:
    """A catalog split as `model` reads it: its kind of features (brought up to date first) and its tokenizer."""
    catalog = open_catalog(catalog_path)
    ensure_features(catalog, features_path, mode, progress=progress)
    with FeatureStore(features_path) as store:
        if store.shape[1:] != (model.config.feature_patches, model.config.patch_dim):
            raise ValueError(f"{features_path} holds {store.shape[1]}x{store.shape[2]} features, the model reads "
                             f"{model.config.feature_patches}x{model.config.patch_dim}: use the features it was trained on")
        tok = CaptionTokenizer(run / "model" / "tokenizer.json", model.config.max_text_len)
        return load_split(catalog, split, store, tok, {})


def evaluate(run: str | Path, catalog_path: str | Path, cfg: EvalConfig, features_path: str | Path | None = None,
             progress: bool = True, out_name: str | None = None) -> dict:
    run = Path(run)
    model, meta = load_model(run / "model")
    device = torch.device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    mode = meta.get("train", {}).get("feature_mode", "grid")
    features_path = Path(features_path) if features_path else default_features_path(catalog_path, mode)
    data = read_split(model, run, catalog_path, cfg.split, features_path, mode, progress)
    model.to(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        score = PairScorer(model, data)
        sim = score.similarity()
        result = {"run": str(run), "split": cfg.split, "config": asdict(cfg), "precision": precision,
                  "paper_protocol": paper_protocol(score, data, cfg, progress),
                  "matching": matching(score, data, cfg),
                  "full_gallery": full_gallery(score, sim, data, cfg, progress,
                                               itc_scale=float(model.itc.scale().detach()),
                                               cross_weight=cross_weight(meta))}
    result["seconds"] = round(time.perf_counter() - start, 1)
    out_dir = run / "eval"
    out_dir.mkdir(exist_ok=True)
    name = out_name or cfg.split
    write_text(out_dir / f"{name}.json", json.dumps(result, indent=2))
    write_text(out_dir / f"{name}.md", markdown(result))
    log.info("Evaluation written to %s (%.0f s).", out_dir / f"{name}.md", result["seconds"])
    return result
