"""What a training step sees: an epoch's batches of products, and TIA's negatives within a batch."""

from __future__ import annotations

import numpy as np
import torch

from .config import TrainConfig
from .data import SplitData, subcategory_first
from .fashionbert import FashionBert


def epoch_batches(data: SplitData, cfg: TrainConfig, epoch: int, text_emb: np.ndarray | None = None) -> list[np.ndarray]:
    """Batches of `subcategories_per_batch` groups of products; one random pose per product.

    A group is a run of products of one subcategory; or, given caption embeddings from the
    current model, a product and its nearest unused neighbours. Neighbour groups make the
    in-batch negatives (ITC's, and the hardest one TIA sees) the near-duplicates a rerank meets
    in a real top-K, not just any product of the same subcategory.
    """
    rng = np.random.default_rng([cfg.seed, epoch, 7])
    rows_of: dict[int, list[int]] = {}
    for row, p in enumerate(data.product):
        rows_of.setdefault(int(p), []).append(row)
    per_sub = max(1, cfg.batch_size // cfg.subcategories_per_batch)
    chunks = []
    if text_emb is not None:
        products = np.array(list(rows_of))
        emb = text_emb[[rows_of[int(p)][0] for p in products]]
        free = np.ones(len(products), dtype=bool)
        for seed in rng.permutation(len(products)):
            if not free[seed]:
                continue
            nearest = np.argsort(-(emb @ emb[seed]), kind="stable")
            group = nearest[free[nearest]][:per_sub]
            free[group] = False
            chunks.append(products[group])
    else:
        by_sub: dict[int, list[int]] = {}
        for p, rows in rows_of.items():
            by_sub.setdefault(int(data.subcategory[rows[0]]), []).append(p)
        for products in by_sub.values():
            products = rng.permutation(products)
            chunks += [products[i : i + per_sub] for i in range(0, len(products), per_sub)]
    order = rng.permutation(len(chunks))
    batches, current = [], []
    for k in order:
        current.extend(int(rng.choice(rows_of[int(p)])) for p in chunks[k])
        if len(current) >= cfg.batch_size:
            batches.append(np.array(current[: cfg.batch_size]))
            current = []
    return batches


@torch.inference_mode()
def caption_embeddings(model: FashionBert, data: SplitData, batch: int = 256, frozen: int = 0) -> np.ndarray:
    """The text tower's embedding of every caption of the split (neighbour batches group by it).
    With `frozen` layers and the split's cached states after them (`text_cache`), the pass starts
    there: the frozen layers are half of the text tower's by default."""
    def embed(rows):
        ids, mask = data.texts(rows)
        if frozen and data.text_cache is not None:
            return model.text_embedding_from(model.text_states(ids, mask, frozen, data.text_cache[rows][:, : ids.shape[1]]), mask)
        return model.text_embedding(ids, mask)

    parts = [(rows, embed(rows)) for rows in data.by_length(batch)]
    out = torch.empty(len(data), parts[0][1].shape[1])
    for rows, emb in parts:
        out[torch.from_numpy(rows)] = emb.float()
    return out.numpy()


def pick_negatives(sim: torch.Tensor, product: np.ndarray, subcategory: np.ndarray, n: int, k: int,
                   rng: np.random.Generator, hard: int = 1) -> np.ndarray:
    """(n, k) image rows for the first n texts: the `hard` hardest other products by two-tower
    similarity, then random other products of the same subcategory (topped up from the whole batch)."""
    s = sim.detach().float().clone()
    s[torch.from_numpy(product[:, None] == product[None, :])] = float("-inf")
    out = np.empty((n, k), dtype=int)
    hard = min(hard, k)
    for i in range(n):
        hardest = torch.argsort(s[i], descending=True, stable=True)[:hard].numpy()
        others = product != product[i]
        others[hardest] = False
        out[i] = np.concatenate([hardest, subcategory_first(rng, others, subcategory, subcategory[i], k - hard)])
    return out
