"""`fashionbert train`: multitask FashionBERT training (MLM, MPM, TIA, ITC) with the adaptive loss.

One step, on a batch of products drawn a few subcategories at a time (so in-batch negatives are
fine-grained ones):

1. ITC: text tower and image tower over the whole batch, symmetric InfoNCE.
2. TIA: for the first `cross_texts` texts, the cross-encoder sees the true image, the batch's
   hardest negative by two-tower similarity and random other products of the same subcategory;
   binary cross-entropy plus a listwise softmax over each text's candidates. The pairs reuse the
   towers' states below the fusion layers, so each pair costs only the fusion layers.
3. MLM and MPM: one more joint pass over the true pairs with 15% of the words masked (whole
   words) and 10% of the patches zeroed.
4. The task losses are weighted by the adaptive rule (model/adaptive_loss.py) and summed.

The run directory holds `model/` (the best weights so far: safetensors + config.json + tokenizer),
`checkpoint/` (weights, optimiser and counters, for resuming), `log.jsonl` (losses and weights
every step), `loss_weights.png` and `summary.json`.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..atomic import replace_dir
from ..catalog.readers import open_catalog
from .adaptive_loss import AdaptiveLossWeights
from .data import SplitData, ensure_features, load_split
from ..runtime.feature_store import FeatureStore, default_features_path
from .features import resolve_precision
from .fashionbert import FashionBert, from_pretrained_bert, load_model, save_model
from .rerank_stage import tia_losses, train_rerank_stage
from ..runtime.scoring import fit_cross_weight, reciprocal_ranks
from ..runtime.tokenizer import CaptionTokenizer

log = logging.getLogger(__name__)
TASKS = ("mlm", "mpm", "tia", "itc")
CUT = "cut by the wall-clock cap"  # how `stopped` begins when --max-minutes ended the loop
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
RERANK_STAGE_OPTIONS = ("rerank_steps", "rerank_epochs", "rerank_max_minutes", "rerank_queries", "rerank_negatives")


@dataclass
class TrainConfig:
    feature_mode: str = "grid"
    backbone: str | None = None  # a local Hugging Face BERT directory; None = the MiniLM package
    layers: int | None = None  # keep the first N layers of the backbone (None = all)
    tasks: tuple[str, ...] = TASKS
    loss_weighting: str = "adaptive"
    batch_size: int = 48  # products per step: ITC's in-batch negatives
    subcategories_per_batch: int = 4  # groups per batch: subcategories, or neighbourhoods (below)
    # From the second epoch, groups are caption-embedding neighbourhoods: a product's hardest
    # in-batch negatives are near-duplicates, as in a rerank's top K. Full-gallery two-tower R@1 79.5 and 87.1 in two
    # seeds against 70.6-75.2 for four runs with subcategory groups (docs/results-history.md).
    neighbour_batches: bool = True
    # Texts per step through the cross-encoder, each with 1 positive + `tia_negatives`. 4, not 12: a
    # quarter of a step cheaper (bench/train_step.py), and the rerank stage (below) trains the
    # cross-encoder far faster than these pairs do.
    cross_texts: int = 4
    tia_negatives: int = 5  # per text: the batch's hardest by two-tower similarity, mined ones, random same-subcategory
    hard_negatives: int = 4  # of those, how many are the batch's hardest by two-tower similarity (at most all)
    # The listwise TIA loss ranks each text's candidates by the score the service ranks by:
    # cross-encoder logit + the two-tower's logit (held fixed). The cross-encoder then learns
    # what the towers get wrong among their own nearest candidates, which is what a rerank is for.
    fused_listwise: bool = True
    masked_texts: int = 8  # true pairs per step in the MLM/MPM pass
    # Of the TIA negatives, drawn from the text's nearest other products in the whole training
    # set. Off by default: measured worse (docs/design.md, "Training").
    mined_negatives: int = 0
    mining_pool: int = 16  # nearest products per text, re-mined with the current model each epoch
    # TIA's gradient stops at the fusion layers' inputs (the layers below learn from ITC, MLM and
    # MPM only). Off by default: measured no better (docs/design.md, "Training").
    tia_detached: bool = False
    separate_fusion: bool = True  # the cross-encoder's fusion layers are its own (model/fashionbert.py)
    # Dropout in the trunk and the new layers (BERT's is 0.1). Off by default: the random masks
    # cost a quarter of a CPU training step (bench/train_step.py), and a few epochs over the
    # demo catalog do not overfit (a tiny catalog trained for many epochs does: tests/conftest.py).
    dropout: float = 0.0
    lr_backbone: float = 1e-4
    lr_new: float = 1e-3  # patch embeddings and heads start from scratch: a higher rate
    weight_decay: float = 0.01
    warmup: float = 0.06  # share of the run
    clip: float = 1.0
    # The budget is work, not time: the same command and seed do the same training on any machine.
    # 4 epochs: where the multitask loop of the tuned recipe had its best validation score.
    epochs: int = 4
    # An optional cap on the multitask loop's wall-clock minutes (validation included); None = none.
    # A capped run fits its learning-rate schedule into the time it has (it still decays to zero),
    # and is no longer reproducible: where it stops depends on the machine.
    max_minutes: float | None = None
    patience: int = 2  # epochs without a better validation score before stopping
    mlm_prob: float = 0.15
    mpm_prob: float = 0.10
    max_text_len: int = 64
    fusion_layers: int = 2  # the last N layers attend across modalities (num_layers = the paper's full model)
    val_products: int = 400
    # Training products held out of training to fit the rerank's weight on the cross-encoder logit
    # (runtime/scoring.py); at most a tenth of them, and none when that is under 20. Off by
    # default: on the demo catalog a default-budget run holding out 400 of the 4,800 reached 61.4
    # full-gallery two-tower R@1 against 71.8 without (docs/results-history.md); `fashionbert calibrate`
    # fits the weight afterwards on products the run never saw instead. With neither, it is 1.
    calibration_products: int = 0
    rerank_k: int = 20  # the rerank depth the weight is fitted for (the service's default)
    # The rerank stage (model/rerank_stage.py): `rerank_steps` steps train the cross-encoder alone,
    # training captions against their two-tower top `rerank_k`; 0 = no stage. 400: about what the
    # tuned recipe's 3 minutes reached on the machine it was tuned on (378).
    rerank_steps: int = 400
    rerank_epochs: int = 3  # a cap in passes over the training captions (tiny catalogs reach it first)
    rerank_max_minutes: float | None = None  # an optional wall-clock cap on the stage, encoding included
    rerank_queries: int = 6  # captions per step
    rerank_negatives: int = 11  # per caption, drawn from its top `rerank_k` other products
    val_queries: int = 100
    checkpoint_minutes: float = 3.0
    precision: str = "auto"
    device: str = "cpu"
    seed: int = 0
    # PyTorch's deterministic kernels: with the same seed, threads and machine, a rerun trains the
    # same weights (multithreaded CPU kernels otherwise sum in a varying order, and training turns
    # those 1e-4 differences into another model within a few epochs).
    deterministic: bool = True
    max_train_products: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(sorted(unknown))}")
        d = dict(d)
        if "tasks" in d:
            d["tasks"] = tuple(d["tasks"])
        return cls(**d)

    def validate(self) -> None:
        bad = set(self.tasks) - set(TASKS)
        if bad or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {', '.join(TASKS)}")
        if self.feature_mode not in ("grid", "crop", "global"):
            raise ValueError("feature_mode must be grid, crop or global")
        if self.batch_size < 2 or not 1 <= self.cross_texts <= self.batch_size:
            raise ValueError("need batch_size >= 2 and 1 <= cross_texts <= batch_size")
        if not 1 <= self.tia_negatives < self.batch_size:
            raise ValueError("need 1 <= tia_negatives < batch_size")
        if self.hard_negatives < 1 or self.masked_texts < 1:  # both are capped by the batch (tia_negatives, batch_size)
            raise ValueError("need hard_negatives >= 1 and masked_texts >= 1")
        if self.mined_negatives < 0 or self.mining_pool < 1:
            raise ValueError("need mined_negatives >= 0 and mining_pool >= 1")
        if self.calibration_products < 0 or self.rerank_k < 2:
            raise ValueError("need calibration_products >= 0 and rerank_k >= 2")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if self.epochs < 1:
            raise ValueError("epochs must be at least 1")
        for name in ("max_minutes", "rerank_max_minutes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive (or null for no wall-clock cap)")
        if self.rerank_steps < 0:
            raise ValueError("rerank_steps (--rerank-steps) must be at least 0 (0 = no rerank stage)")
        if min(self.rerank_epochs, self.rerank_queries, self.rerank_negatives) < 1:
            raise ValueError("need rerank_epochs, rerank_queries and rerank_negatives >= 1")

    @property
    def rerank_stage(self) -> bool:
        """Whether the run ends with the rerank stage (it trains the cross-encoder's own layers)."""
        return self.rerank_steps > 0 and "tia" in self.tasks and self.separate_fusion


# Masking -----------------------------------------------------------------------------------------


def whole_word_mask(ids: torch.Tensor, word_ids: list[list[int | None]], prob: float, tok: CaptionTokenizer,
                    rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 80/10/10 masking of whole words (every piece of a chosen word): inputs and labels (-100 = no loss)."""
    inputs, labels = ids.clone(), torch.full_like(ids, -100)
    for r, words in enumerate(word_ids):
        present = sorted({w for w in words[: ids.shape[1]] if w is not None})
        if not present:
            continue
        chosen = set(rng.choice(present, max(1, round(prob * len(present))), replace=False).tolist())
        for t, w in enumerate(words[: ids.shape[1]]):
            if w in chosen:
                labels[r, t] = ids[r, t]
                u = rng.random()
                if u < 0.8:
                    inputs[r, t] = tok.mask_id
                elif u < 0.9:
                    inputs[r, t] = int(rng.integers(1000, tok.vocab_size))  # a random ordinary word piece
    return inputs, labels


def mask_patches(feats: torch.Tensor, prob: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero ~prob of the patches (at least one per image when there are several): inputs and the mask (B, P)."""
    b, p, _ = feats.shape
    masked = torch.from_numpy(rng.random((b, p)) < prob)
    if p > 1:
        none = ~masked.any(1)
        masked[none, torch.from_numpy(rng.integers(0, p, int(none.sum())))] = True
    return feats.masked_fill(masked[..., None], 0.0), masked


# One step ----------------------------------------------------------------------------------------


def contrastive_loss(t: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE at inverse temperature `scale`; other images of the same product are neither
    positives nor negatives."""
    logits = scale * t @ v.T
    logits = logits.masked_fill(same & ~torch.eye(len(t), dtype=torch.bool), float("-inf"))
    target = torch.arange(len(t))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


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
        pool = np.flatnonzero(others & (subcategory == subcategory[i]))
        rest = np.flatnonzero(others & (subcategory != subcategory[i]))
        picked = rng.choice(pool, min(k - hard, len(pool)), replace=False)
        if len(picked) < k - hard:
            picked = np.concatenate([picked, rng.choice(rest, k - hard - len(picked), replace=False)])
        out[i] = np.concatenate([hardest, picked])
    return out


def step_losses(model: FashionBert, data: SplitData, rows: np.ndarray, cfg: TrainConfig, tok: CaptionTokenizer,
                rng: np.random.Generator, mined: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """The task losses of one batch; `mined` (rows of `data`, (N, pool)) holds each row's nearest
    other products in the whole split, the source of TIA's mined negatives."""
    ids, mask = data.texts(rows)
    feats = data.feats[rows].float()
    product, subcat = data.product[rows], data.subcategory[rows]
    losses: dict[str, torch.Tensor] = {}

    # Each text and image is encoded once below the fusion layers; the towers and the
    # cross-encoder's pairs all start from these states.
    text_states = model.text_states(ids, mask)  # (B, T, H)
    image_states = model.image_states(feats)  # (B, P, H)
    t = model.text_embedding_from(text_states, mask)  # (B, E)
    v = model.image_embedding_from(image_states)  # (B, E)
    if "itc" in cfg.tasks:
        same = torch.from_numpy(product[:, None] == product[None, :])
        losses["itc"] = contrastive_loss(t, v, model.itc.scale(), same)

    c, k = cfg.cross_texts, cfg.tia_negatives
    if "tia" in cfg.tasks:
        tia_text, tia_image = (text_states.detach(), image_states.detach()) if cfg.tia_detached else (text_states, image_states)
        # The batch's hardest always stays; mined ones take up to the rest of the k places.
        m = min(cfg.mined_negatives, k - 1, mined.shape[1]) if mined is not None else 0
        negs = pick_negatives(t @ v.T, product, subcat, c, k - m, rng, cfg.hard_negatives)  # (c, k - m) rows of the batch
        neg_states = tia_image[negs.reshape(-1)].view(c, k - m, *tia_image.shape[1:])
        if m:
            # The in-batch hardest is one of ~11 products of its subcategory; a rerank meets the
            # nearest of a whole catalog. Mined negatives are those: products one or two
            # attributes away, which only the cross-encoder's attention can tell apart.
            picks = np.stack([rng.choice(mined[r], m, replace=False) for r in rows[:c]])  # (c, m)
            with torch.set_grad_enabled(torch.is_grad_enabled() and not cfg.tia_detached):
                extra = model.image_states(data.feats[picks.reshape(-1)].float())
            neg_states = torch.cat([neg_states, extra.view(c, m, *extra.shape[1:])], 1)
        # Pairs: c true pairs, then text 0 with its k negatives, text 1 with its k, ...
        text_rows = np.concatenate([np.arange(c), np.repeat(np.arange(c), k)])
        logits = model.match_logits_from(tia_text[text_rows], mask[text_rows],
                                         torch.cat([tia_image[:c], neg_states.flatten(0, 1)]))
        # Binary (positives and negatives counting equally), and listwise: each text's true image
        # against its k negatives, a softmax over k + 1 logits. It says "this one rather than
        # those", a stronger signal per pair than k + 1 yes/no answers.
        ranked = torch.cat([logits[:c, None], logits[c:].view(c, k)], 1)  # (c, 1 + k), the true image first
        tower = 0.0
        if cfg.fused_listwise:
            with torch.no_grad():
                scale = model.itc.scale()
                candidates = v[torch.from_numpy(np.concatenate([np.arange(c)[:, None], negs], 1))]  # (c, 1 + k - m, E)
                if m:
                    candidates = torch.cat([candidates, model.image_embedding_from(extra).view(c, m, -1)], 1)
                tower = scale * (t[:c, None] * candidates).sum(-1)
            tower = tower.float()
        listwise, binary = tia_losses(ranked.float(), tower)
        losses["tia"] = binary + listwise

    # MLM and MPM: a separate joint pass over masked copies of the true pairs. TIA never sees a
    # mask, so "has [MASK] tokens" cannot come to mean "matches", and it trains on what it serves.
    if "mlm" in cfg.tasks or "mpm" in cfg.tasks:
        c = min(cfg.masked_texts, len(rows))
        m_text, m_image = text_states[:c], image_states[:c]
        if "mlm" in cfg.tasks:
            masked_ids, mlm_labels = whole_word_mask(ids[:c], [data.word_ids[r] for r in rows[:c]], cfg.mlm_prob, tok, rng)
            m_text = model.text_states(masked_ids, mask[:c])
        if "mpm" in cfg.tasks:
            masked_feats, patch_masked = mask_patches(feats[:c], cfg.mpm_prob, rng)
            m_image = model.image_states(masked_feats)
        hidden, _, first_patch = model.fuse(m_text, mask[:c], m_image)
        if "mlm" in cfg.tasks:
            where = mlm_labels != -100
            text_hidden = hidden[:, : mlm_labels.shape[1]]  # text comes first in every packed row
            losses["mlm"] = F.cross_entropy(model.mlm(text_hidden[where]).float(), mlm_labels[where])
        if "mpm" in cfg.tasks and patch_masked.any():  # one global feature is masked only 10% of the time
            b_idx, p_idx = torch.nonzero(patch_masked, as_tuple=True)
            predicted = model.mpm(hidden[b_idx, first_patch[b_idx] + p_idx]).float()
            target = feats[b_idx, p_idx]
            losses["mpm"] = F.kl_div(F.log_softmax(predicted, -1), F.softmax(target, -1), reduction="batchmean")
    return losses


# Batches and validation --------------------------------------------------------------------------


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
def mine_neighbours(model: FashionBert, data: SplitData, pool: int, use_images: bool, batch: int = 128) -> np.ndarray:
    """(N, pool) rows: for each row's caption, the nearest rows of other products in the split.

    Nearest by the two-tower similarity (caption to image), the order a recall hands the
    reranker; before the image tower has learned anything (`use_images` false), by caption to
    caption similarity of the pre-trained text tower, which already finds near-identical captions.
    """
    t = caption_embeddings(model, data, batch)
    if use_images:
        v = torch.cat([model.image_embedding(data.feats[i : i + batch].float()) for i in range(0, len(data), batch)])
        v = v.float().numpy()
    else:
        v = t
    pool = min(pool, len(data) - int(np.bincount(data.product).max()))  # never a pose of the same product
    out = np.empty((len(data), pool), dtype=np.int64)
    for i in range(0, len(data), 512):
        s = t[i : i + 512] @ v.T
        s[data.product[i : i + 512, None] == data.product[None, :]] = -np.inf
        out[i : i + 512] = np.argpartition(-s, pool - 1, axis=1)[:, :pool]
    return out


@torch.inference_mode()
def caption_embeddings(model: FashionBert, data: SplitData, batch: int = 256) -> np.ndarray:
    out = [model.text_embedding(*data.texts(np.arange(i, min(len(data), i + batch)))) for i in range(0, len(data), batch)]
    return torch.cat(out).float().numpy()


class PairScorer:
    """Scores (text, image) pairs of one split with the cross-encoder, encoding each text and image once.

    The states below the fusion layers are computed per item up front; a pair then costs only
    the fusion layers, exactly as a rerank in the service will.
    """

    @torch.inference_mode()
    def __init__(self, model: FashionBert, data: SplitData, batch: int = 128):
        self.model, self.data = model, data
        text_states, image_states, t, v = [], [], [], []
        for i in range(0, len(data), batch):
            rows = np.arange(i, min(len(data), i + batch))
            ids, mask = data.ids[rows], data.mask[rows]
            ts = model.text_states(ids, mask)
            vs = model.image_states(data.feats[rows].float())
            text_states.append(ts)
            image_states.append(vs)
            t.append(model.text_embedding_from(ts, mask))
            v.append(model.image_embedding_from(vs))
        self.text_states, self.image_states = torch.cat(text_states), torch.cat(image_states)
        self.text_emb, self.image_emb = torch.cat(t).float(), torch.cat(v).float()

    def similarity(self) -> np.ndarray:
        """Two-tower cosine of every caption (row) with every image (column), in fp32 even under autocast."""
        with torch.autocast(self.text_emb.device.type, enabled=False):
            return (self.text_emb @ self.image_emb.T).numpy()

    @torch.inference_mode()
    def logits(self, text_rows, image_rows, batch: int = 128) -> np.ndarray:
        """Cross-encoder match logit for each (text row, image row) pair."""
        text_rows, image_rows = np.asarray(text_rows), np.asarray(image_rows)
        out = []
        for i in range(0, len(text_rows), batch):
            t, v = text_rows[i : i + batch], image_rows[i : i + batch]
            mask = self.data.mask[t]
            width = int(mask.sum(1).max())
            out.append(self.model.match_logits_from(self.text_states[t, :width], mask[:, :width], self.image_states[v]).float())
        return torch.cat(out).numpy() if out else np.zeros(0)

    def __call__(self, text_rows, image_rows, batch: int = 128) -> np.ndarray:
        """Cross-encoder match probability for each (text row, image row) pair."""
        return 0.5 * (1 + np.tanh(self.logits(text_rows, image_rows, batch) / 2))  # the sigmoid, without overflow


def quick_validation(model: FashionBert, data: SplitData, cfg: TrainConfig, autocast) -> dict[str, float]:
    """Two-tower R@1 over the validation subset, and R@1 after reranking its top 10 the way the
    service does (cross-encoder logit + two-tower logit)."""
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
            scores = scorer.logits(np.full(len(top), q), top) + itc_scale * sim[q, top]
            hits += bool(data.product[top[int(np.argmax(scores))]] == data.product[q])
    model.train()
    rerank_r1 = hits / len(queries)
    return {"two_tower_r1": two_tower_r1, "rerank_r1": rerank_r1, "score": (two_tower_r1 + rerank_r1) / 2}


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
    tower = float(model.itc.scale().detach()) * np.take_along_axis(sim, top, 1)
    hit = data.product[top] == data.product[:, None]
    weight, mrr = fit_cross_weight(cross, tower, hit)
    first = lambda scores: float(np.mean(reciprocal_ranks(scores, hit) == 1.0))  # noqa: E731
    rerank = {"cross_weight": weight, "fitted_on": len(data), "source": source, "K": k,
              "criterion": "mean reciprocal rank in the top K",
              "R@1_two_tower": first(tower), "R@1_fitted": first(weight * cross + tower), "R@1_weight_1": first(cross + tower),
              "mrr_by_weight": {str(w): round(v, 5) for w, v in mrr.items()}}
    tmp = run / "model" / "config.json.tmp"
    tmp.write_text(json.dumps({**meta, "rerank": rerank}, indent=2))
    os.replace(tmp, run / "model" / "config.json")
    log.info("Rerank weight on the cross-encoder logit: %.2f, fitted on %d %s "
             "(their R@1 in a top %d: two-tower %.3f, reranked %.3f; with weight 1: %.3f).", weight, len(data), source, k,
             rerank["R@1_two_tower"], rerank["R@1_fitted"], rerank["R@1_weight_1"])
    return rerank


# The loop ----------------------------------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    elapsed: float = 0.0
    best_score: float = -1.0
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    stopped: str = ""


def param_groups(model: FashionBert, cfg: TrainConfig) -> list[dict]:
    """AdamW's groups: the pre-trained trunk (its fusion-layer copies included), the new layers and
    heads, and the temperature (no weight decay). `base_lr` is what the schedule scales. (A faster
    rate for the fusion layers, 5e-4, was measured worse: docs/results-history.md.)"""
    backbone = {id(p) for p in model.backbone_parameters()}
    scale = model.itc.logit_scale
    groups = [
        {"params": [p for p in model.parameters() if id(p) in backbone], "lr": cfg.lr_backbone},
        {"params": [p for p in model.parameters() if id(p) not in backbone and p is not scale], "lr": cfg.lr_new},
        {"params": [scale], "lr": cfg.lr_new, "weight_decay": 0.0},
    ]
    return [{**g, "base_lr": g["lr"]} for g in groups]


def lr_factor(step: int, total: int, warmup: float, elapsed: float = 0.0, budget: float | None = None) -> float:
    """Linear warm-up then linear decay over `total` steps; under a wall-clock `budget` (seconds), over
    whichever ends first, so a run the cap cuts still ends its schedule at zero."""
    progress = step / total if total else 1.0
    if budget:
        progress = max(progress, elapsed / budget)
    if progress < warmup:
        return max(progress / warmup, 0.01)
    return max(0.0, (1 - progress) / (1 - warmup))


def _save_checkpoint(run: Path, model, optimizer, state: TrainState, weighting, cfg: TrainConfig) -> None:
    tmp = run / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    torch.save({"optimizer": optimizer.state_dict(), "state": asdict(state), "weights": weighting.weights,
                "config": asdict(cfg), "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
    replace_dir(tmp, run / "checkpoint")  # the commit point: a crash before it keeps the previous checkpoint


def _save_best(run: Path, model, cfg: TrainConfig, bert_dir: Path, metrics: dict, extra: dict | None = None) -> None:
    tmp = run / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, extra={"train": asdict(cfg), "validation": metrics, **(extra or {})})
    for name in TOKENIZER_FILES:
        if (bert_dir / name).is_file():
            shutil.copy(bert_dir / name, tmp / name)
    # One step (no moment without model/): a resume after a crash here still finds the best model and
    # so still runs the rerank stage on it.
    replace_dir(tmp, run / "model")


def plot_weights(log_path: Path, out: Path) -> None:
    """Task weights over training, like the paper's Figure 4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, (ax_w, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    for task in rows[-1]["weights"]:
        steps = [r["step"] for r in rows if task in r["weights"]]
        ax_w.plot(steps, [r["weights"][task] for r in rows if task in r["weights"]], label=task.upper())
        ax_l.plot(steps, [r["losses"][task] for r in rows if task in r["losses"]], label=task.upper())
    ax_w.set(title="Adaptive loss weights", xlabel="step", ylabel="weight")
    ax_l.set(title="Task losses", xlabel="step", ylabel="loss", yscale="log")
    for ax in (ax_w, ax_l):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def train(catalog_path: str | Path, run: str | Path, cfg: TrainConfig, features_path: str | Path | None = None,
          overwrite: bool = False, progress: bool = True) -> dict:
    cfg.validate()
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if cfg.deterministic and cfg.device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for reproducible sums
    # warn_only: an op without a deterministic kernel (some on CUDA) warns instead of stopping the run.
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    try:
        return _train(catalog_path, run, cfg, features_path, overwrite, progress)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _train(catalog_path: str | Path, run: str | Path, cfg: TrainConfig, features_path: str | Path | None,
           overwrite: bool, progress: bool) -> dict:
    run = Path(run)
    if overwrite and run.exists():
        shutil.rmtree(run)
    resume = (run / "checkpoint" / "trainer.pt").is_file()
    if run.exists() and any(run.iterdir()) and not resume:
        raise FileExistsError(f"{run} exists without a checkpoint to resume: pass --overwrite or choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    precision = resolve_precision(cfg.precision, device)

    catalog = open_catalog(catalog_path)
    features_path = Path(features_path) if features_path else default_features_path(catalog_path, cfg.feature_mode)
    ensure_features(catalog, features_path, cfg.feature_mode, progress=progress)
    store = FeatureStore(features_path)

    overrides = {"num_patches": store.shape[1], "patch_dim": store.shape[2], "max_text_len": cfg.max_text_len,
                 "fusion_layers": cfg.fusion_layers, "dropout": cfg.dropout}
    model, bert_dir = from_pretrained_bert(cfg.backbone, **overrides)
    if cfg.layers:
        if not 1 <= cfg.layers <= model.config.num_layers:
            raise ValueError(f"layers must be between 1 and {model.config.num_layers}")
        model.encoder.layer = model.encoder.layer[: cfg.layers]
        model.config.num_layers = cfg.layers
        model.config.fusion_layers = min(cfg.fusion_layers, cfg.layers)
    if cfg.separate_fusion:
        model.separate_fusion_layers()
    tok = CaptionTokenizer(bert_dir / "tokenizer.json", cfg.max_text_len)
    subcats: dict[str, int] = {}
    held = calibration_products(catalog, cfg)
    train_data = load_split(catalog, "train", store, tok, subcats, limit=cfg.max_train_products, seed=cfg.seed,
                            products=lambda p: p not in held)
    val_data = load_split(catalog, "validation", store, tok, subcats, limit=cfg.val_products, seed=cfg.seed)
    calib_data = load_split(catalog, "train", store, tok, subcats, products=held.__contains__) if held else None
    store.close()

    groups = param_groups(model, cfg)
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    weighting = AdaptiveLossWeights(list(cfg.tasks), cfg.loss_weighting)
    state = TrainState()
    if resume:
        ckpt = torch.load(run / "checkpoint" / "trainer.pt", map_location="cpu", weights_only=False)
        # Options added since the run started count with today's defaults: a run from before a
        # default changed (cross_texts 12 -> 4 with the rerank stage) resumes only with its own
        # settings in --config. Once the loop is done, the rerank stage's options may change.
        loop_done = bool(ckpt["state"].get("stopped")) or ckpt["state"]["epoch"] >= ckpt["config"].get("epochs", cfg.epochs)
        ignore = set(RERANK_STAGE_OPTIONS) if loop_done else set()
        # Options that no longer exist (rerank_minutes, before the budget was in work) do not count.
        known = {f.name for f in fields(TrainConfig)}
        saved = {k: v for k, v in {**asdict(TrainConfig()), **ckpt["config"]}.items() if k not in ignore and k in known}
        if saved != {k: v for k, v in asdict(cfg).items() if k not in ignore}:
            raise ValueError(f"{run} holds a run with other settings: pass --overwrite to start again")
        if loop_done and (run / "summary.json").is_file():
            log.info("%s is already trained; pass --overwrite to train again.", run)
            return json.loads((run / "summary.json").read_text())
        resumed_model, _ = load_model(run / "checkpoint")
        model.load_state_dict(resumed_model.state_dict())
        optimizer.load_state_dict(ckpt["optimizer"])
        state = TrainState(**ckpt["state"])
        weighting.weights = ckpt["weights"]
        torch.set_rng_state(ckpt["torch_rng"])
        log.info("Resuming %s at epoch %d, step %d (%.1f minutes of training done).", run, state.epoch + 1, state.step,
                 state.elapsed / 60)
    model.to(device).train()
    shared = model.last_shared_weight()  # where the adaptive rule reads gradient norms
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")  # noqa: E731
    batches_per_epoch = len(epoch_batches(train_data, cfg, 0))
    total_steps = cfg.epochs * batches_per_epoch
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    log.info("Training on %d products (%d validation, subset of %d for per-epoch checks): %d steps per epoch, "
             "%d epochs (%d steps)%s, %s, tasks %s, %s loss weights.", len(train_data),
             len(catalog.records("validation")), len(val_data), batches_per_epoch, cfg.epochs, total_steps,
             f", cut at {cfg.max_minutes:g} minutes if not done by then" if budget else "",
             precision, "+".join(cfg.tasks), cfg.loss_weighting)

    log_file = open(run / "log.jsonl", "a")
    last_ckpt = time.perf_counter()
    started = time.perf_counter() - state.elapsed
    try:
        while state.epoch < cfg.epochs and not state.stopped:
            if budget and time.perf_counter() - started > budget:  # before this epoch's embedding and mining
                state.stopped = f"{CUT} of {budget / 60:g} minutes"
                break
            text_emb = None
            if cfg.neighbour_batches and state.epoch > 0:
                model.eval()
                with autocast():
                    text_emb = caption_embeddings(model, train_data)
                model.train()
            batches = epoch_batches(train_data, cfg, state.epoch, text_emb)
            mined = None
            if "tia" in cfg.tasks and cfg.mined_negatives:
                model.eval()
                with autocast():
                    mined = mine_neighbours(model, train_data, cfg.mining_pool, use_images=state.epoch > 0)
                model.train()
            bar = tqdm(total=len(batches), initial=state.step_in_epoch, desc=f"Epoch {state.epoch + 1}",
                       disable=not progress, unit="step", mininterval=1.0)
            for rows in batches[state.step_in_epoch :]:
                state.elapsed = time.perf_counter() - started
                if budget and state.elapsed > budget:
                    state.stopped = f"{CUT} of {budget / 60:g} minutes"
                    break
                rng = np.random.default_rng([cfg.seed, state.step, 3])
                factor = lr_factor(state.step, total_steps, cfg.warmup, state.elapsed, budget)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                with autocast():
                    losses = step_losses(model, train_data, rows, cfg, tok, rng, mined)
                weights = weighting.update(losses, shared)
                loss = weighting.combine(losses, weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                optimizer.step()
                state.step += 1
                state.step_in_epoch += 1
                record = {"step": state.step, "epoch": state.epoch + 1, "elapsed": round(state.elapsed, 1),
                          "lr_factor": round(factor, 4), "losses": {k: round(float(v.detach()), 4) for k, v in losses.items()},
                          "weights": {k: round(w, 4) for k, w in weights.items()}}
                log_file.write(json.dumps(record) + "\n")
                if state.step % 10 == 0:
                    log_file.flush()
                bar.set_postfix_str(" ".join(f"{k}={record['losses'][k]:.3f}/w{weights[k]:.2f}" for k in losses))
                bar.update(1)
                if time.perf_counter() - last_ckpt > cfg.checkpoint_minutes * 60:
                    log_file.flush()
                    _save_checkpoint(run, model, optimizer, state, weighting, cfg)
                    last_ckpt = time.perf_counter()
            bar.close()
            epoch_done = state.step_in_epoch >= len(batches)
            metrics = quick_validation(model, val_data, cfg, autocast)
            state.elapsed = time.perf_counter() - started
            state.history.append({"epoch": state.epoch + 1, "step": state.step, "complete": epoch_done,
                                  "minutes": round(state.elapsed / 60, 2), **metrics})
            log.info("Epoch %d%s: validation two-tower R@1 %.3f, reranked R@1 %.3f (%.1f min).", state.epoch + 1,
                     "" if epoch_done else " (partial)", metrics["two_tower_r1"], metrics["rerank_r1"], state.elapsed / 60)
            if metrics["score"] > state.best_score:
                state.best_score, state.bad_epochs = metrics["score"], 0
                _save_best(run, model, cfg, bert_dir, metrics)
            else:
                state.bad_epochs += 1
                if state.bad_epochs >= cfg.patience:
                    state.stopped = f"no better validation score for {cfg.patience} epochs"
            if epoch_done:
                state.epoch += 1
                state.step_in_epoch = 0
            log_file.flush()
            _save_checkpoint(run, model, optimizer, state, weighting, cfg)
            last_ckpt = time.perf_counter()
        state.stopped = state.stopped or f"{cfg.epochs} epochs done"
    except KeyboardInterrupt:
        log_file.flush()
        _save_checkpoint(run, model, optimizer, state, weighting, cfg)
        log.warning("Interrupted: checkpoint saved; run the same command again to resume.")
        raise
    finally:
        log_file.close()

    stage = None
    if cfg.rerank_stage and (run / "model").is_dir():
        best, meta = load_model(run / "model")
        stage = meta.get("rerank_stage")  # already done when a crash came after it
        if stage is None:
            best.to(device)
            stage = train_rerank_stage(best, train_data, cfg, autocast, progress)
            stage["validation_before"] = meta["validation"]
            stage["validation_after"] = quick_validation(best, val_data, cfg, autocast)
            best.eval()
            log.info("After the rerank stage: validation reranked R@1 %.3f (before: %.3f; two-tower %.3f).",
                     stage["validation_after"]["rerank_r1"], meta["validation"]["rerank_r1"],
                     stage["validation_after"]["two_tower_r1"])
            # "validation" describes the weights saved beside it: the stage's.
            _save_best(run, best, cfg, bert_dir, stage["validation_after"], extra={"rerank_stage": stage})

    # None: not fitted here (`fashionbert calibrate` may fit it later, into model/config.json).
    rerank = None
    if calib_data is not None and (run / "model").is_dir():
        rerank = calibrate_rerank(run, *load_model(run / "model"), calib_data, cfg.rerank_k, device, autocast)
    loop_cut = state.stopped.startswith(CUT)
    cut = loop_cut or bool(stage and stage.get("cut"))
    if loop_cut:
        log.warning("Training was cut by its %g-minute cap (--max-minutes) after %d of the about %d steps of its %d "
                    "epochs (%.0f%%): the learning rate was fitted into that time, so this model saw less training "
                    "than the recipe plans and is weaker than it; without --max-minutes the run does all its epochs "
                    "on any machine.", cfg.max_minutes, state.step, total_steps, cfg.epochs, 100 * state.step / total_steps)
    summary = {"stopped": state.stopped, "cut": cut, "steps": state.step, "planned_steps": total_steps,
               "epochs": len(state.history),
               "training_minutes": round(state.elapsed / 60 + (stage["minutes"] if stage else 0), 2),
               "rerank_stage": stage,
               "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "best_validation": max(state.history, key=lambda h: h["score"]) if state.history else None,
               "history": state.history, "rerank": rerank, "precision": precision, "config": asdict(cfg),
               "features": str(features_path), "catalog": str(catalog_path)}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_weights(run / "log.jsonl", run / "loss_weights.png")
    log.info("Training stopped (%s) after %d steps, %.1f minutes; best model in %s.", state.stopped, state.step,
             state.elapsed / 60, run / "model")
    return summary
