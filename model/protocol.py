"""The paper's protocol (FashionBERT Table 1), one copy for evaluation and the export's benchmarks.

Each query (a caption, or an image) is ranked against its positive and `negatives` candidates of
other products, from the same subcategory first (topped up from other subcategories when it has
fewer), by a score function: the cross-encoder's match probability in `fashionbert eval`, its
logit (the same order) when ONNX variants are compared. Ties count against the query (a negative
scoring the same ranks ahead). Rank@1/5/10 for image->text and text->image; evaluation reports
mean and spread over `draws` draws with fixed seeds.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from .data import SplitData, first_row_per_product, subcategory_first

KS = (1, 5, 10)


def rank_of_positive(scores: np.ndarray) -> int:
    """scores[0] is the positive; 1 + the number of candidates scoring at least as high."""
    return 1 + int((scores[1:] >= scores[0]).sum())


def recall_at(ranks, ks=KS) -> dict[str, float]:
    ranks = np.asarray(ranks)
    return {f"R@{k}": float(np.mean(ranks <= k)) * 100 for k in ks}


def protocol_ranks(score, product: np.ndarray, subcategory: np.ndarray, queries: int, negatives: int = 100,
                   seed: int = 0, draw: int = 0, bar=None) -> dict[str, np.ndarray]:
    """One draw: the rank of each query's positive in both directions ("t2i", "i2t").

    `score(text_rows, image_rows)` -> a score per pair of rows; row i is one item of product
    `product[i]` (of the paper's unit, one row per product, in evaluation). Queries are rows drawn
    with the seed [seed, draw]; each gets min(negatives, other products) negatives. `bar` is
    advanced once per query and direction.
    """
    rng = np.random.default_rng([seed, draw])
    n = len(product)
    chosen = rng.choice(n, min(queries, n), replace=False)
    ranks = {"t2i": [], "i2t": []}
    for q in chosen:
        others = product != product[q]
        rows = np.concatenate([[q], subcategory_first(rng, others, subcategory, subcategory[q],
                                                      min(negatives, int(others.sum())))])
        # text -> image: the query's caption with each candidate image; image -> text: the reverse.
        ranks["t2i"].append(rank_of_positive(score(np.full(len(rows), q), rows)))
        ranks["i2t"].append(rank_of_positive(score(rows, np.full(len(rows), q))))
        if bar is not None:
            bar.update(2)
    return {d: np.array(r) for d, r in ranks.items()}


def paper_protocol(score, data: SplitData, cfg, progress: bool = True) -> dict:
    """`score(text_rows, image_rows)` -> match probability per pair of rows of `data` (the
    cross-encoder, in practice), over one row per product. `cfg` (an EvalConfig, model/evaluate.py)
    gives `queries` per direction and draw, `negatives`, `draws` and `seed`."""
    products = first_row_per_product(data.product)
    view_product, view_sub = data.product[products], data.subcategory[products]
    n_queries = int(min(cfg.queries, len(products)))
    negatives = min(cfg.negatives, len(products) - 1)
    bar = tqdm(total=cfg.draws * 2 * n_queries, desc="Paper protocol", unit="query", disable=not progress,
               mininterval=1.0)
    draws = {"t2i": [], "i2t": []}
    for draw in range(cfg.draws):
        ranks = protocol_ranks(lambda t, v: score(products[t], products[v]), view_product, view_sub, cfg.queries,
                               cfg.negatives, cfg.seed, draw, bar)
        for d in ranks:
            draws[d].append(recall_at(ranks[d]))
    bar.close()
    out = {}
    for d, per_draw in draws.items():
        out[d] = {k: {"mean": float(np.mean([r[k] for r in per_draw])), "std": float(np.std([r[k] for r in per_draw])),
                      "draws": [r[k] for r in per_draw]} for k in per_draw[0]}
    out["queries_per_draw"] = n_queries
    out["candidates"] = negatives + 1
    out["chance_R@1"] = 100 / (negatives + 1)
    return out
