"""`fashionbert eval`: the paper's protocol, text-image matching, and full-gallery retrieval as the service does it.

- Paper protocol (FashionBERT Table 1): each query (a caption, or an image) is ranked against its
  positive and `negatives` candidates of other products from the same subcategory (topped up
  from other subcategories when it has fewer), scored by the cross-encoder's match probability.
  Rank@1/5/10 for image->text and text->image; mean and spread over `draws` draws with fixed
  seeds. Ties count against the query (a negative scoring the same ranks ahead).
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

from ..catalog.readers import open_catalog
from .data import SplitData, ensure_features, load_split, negatives_by_subcategory
from ..runtime.feature_store import FeatureStore, default_features_path
from .features import resolve_precision
from .fashionbert import FashionBert, load_model
from ..runtime.scoring import cross_weight
from ..runtime.tokenizer import CaptionTokenizer
from .train import PairScorer

log = logging.getLogger(__name__)
KS = (1, 5, 10)


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


def rank_of_positive(scores: np.ndarray) -> int:
    """scores[0] is the positive; 1 + the number of candidates scoring at least as high."""
    return 1 + int((scores[1:] >= scores[0]).sum())


def recall_at(ranks, ks=KS) -> dict[str, float]:
    ranks = np.asarray(ranks)
    return {f"R@{k}": float(np.mean(ranks <= k)) * 100 for k in ks}


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


def one_row_per_product(data: SplitData) -> np.ndarray:
    _, first = np.unique(data.product, return_index=True)
    return np.sort(first)


def paper_protocol(score, data: SplitData, cfg: EvalConfig, progress: bool = True) -> dict:
    """`score(text_rows, image_rows)` -> match probability per pair (the cross-encoder, in practice)."""
    products = one_row_per_product(data)
    draws = {"t2i": [], "i2t": []}
    total = cfg.draws * 2 * min(cfg.queries, len(products))
    bar = tqdm(total=total, desc="Paper protocol", unit="query", disable=not progress, mininterval=1.0)
    view = data.subset(products)
    for draw in range(cfg.draws):
        rng = np.random.default_rng([cfg.seed, draw])
        queries = rng.choice(len(products), min(cfg.queries, len(products)), replace=False)
        ranks = {"t2i": [], "i2t": []}
        for q in queries:
            negs = negatives_by_subcategory(view, int(q), cfg.negatives, rng)
            candidates = np.concatenate([[q], negs])
            rows = products[candidates]
            # text -> image: the query's caption with each candidate image
            ranks["t2i"].append(rank_of_positive(score(np.full(len(rows), products[q]), rows)))
            # image -> text: the query's image with each candidate caption
            ranks["i2t"].append(rank_of_positive(score(rows, np.full(len(rows), products[q]))))
            bar.update(2)
        for d in ranks:
            draws[d].append(recall_at(ranks[d]))
    bar.close()
    out = {}
    for d, per_draw in draws.items():
        out[d] = {k: {"mean": float(np.mean([r[k] for r in per_draw])), "std": float(np.std([r[k] for r in per_draw])),
                      "draws": [r[k] for r in per_draw]} for k in per_draw[0]}
    out["queries_per_draw"] = int(min(cfg.queries, len(products)))
    out["candidates"] = cfg.negatives + 1
    out["chance_R@1"] = 100 / (cfg.negatives + 1)
    return out


def matching(score, data: SplitData, cfg: EvalConfig) -> dict:
    products = one_row_per_product(data)
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
    products = one_row_per_product(data)
    rng = np.random.default_rng([cfg.seed, 42])
    queries = np.sort(rng.choice(products, min(cfg.gallery_queries, len(products)), replace=False))
    two_tower, reranked, fused = [], [], []
    for q in tqdm(queries, desc="Full-gallery rerank", unit="query", disable=not progress, mininterval=1.0):
        order = np.argsort(-sim[q], kind="stable")[: cfg.recall_n]
        two_tower.append(_first_hit(order, data.product, data.product[q]))
        top = order[: cfg.rerank_k]
        if hasattr(score, "logits"):  # exact logits: a probability saturates at 1.0 in float32
            logits = score.logits(np.full(len(top), q), top)
        else:
            p = np.clip(score(np.full(len(top), q), top).astype(np.float64), 1e-12, 1 - 1e-12)
            logits = np.log(p / (1 - p))
        new_order = np.concatenate([top[np.argsort(-logits, kind="stable")], order[cfg.rerank_k :]])
        reranked.append(_first_hit(new_order, data.product, data.product[q]))
        if itc_scale is not None:
            combined = cross_weight * logits + itc_scale * sim[q, top]
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
        if store.shape[1:] != (model.config.num_patches, model.config.patch_dim):
            raise ValueError(f"{features_path} holds {store.shape[1]}x{store.shape[2]} features, the model reads "
                             f"{model.config.num_patches}x{model.config.patch_dim}: use the features it was trained on")
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
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out_dir / f"{name}.md").write_text(markdown(result))
    log.info("Evaluation written to %s (%.0f s).", out_dir / f"{name}.md", result["seconds"])
    return result
