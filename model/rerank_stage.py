"""The rerank stage: the last minutes of `fashionbert train` train the cross-encoder alone, on the
candidates a search hands it.

After the multitask training, the towers are fixed and the cross-encoder's own weights (its copy
of the fusion layers and the TIA head) are trained on each training caption against its true
image and negatives drawn from its two-tower top K over the *whole* training set: the lists the
service reranks. The loss is the multitask TIA loss (model/train.py): a softmax over each list of
the service's score (cross-encoder logit + the fixed two-tower logit), so the cross-encoder learns
what the towers get wrong, plus the balanced match / no-match term that keeps /match's
probability calibrated.

Why a stage of its own: below the fusion layers every caption and image is encoded once, up
front, so a pair costs only the two fusion layers; a multitask step spends most of its time on
the towers, MLM and MPM. On the demo catalog three minutes here train the cross-encoder on more
pairs than the whole multitask run does (README, "Training").
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import SplitData
from .fashionbert import FashionBert

log = logging.getLogger(__name__)


def rerank_candidates(sim: np.ndarray, product: np.ndarray, k: int) -> np.ndarray:
    """(N, k) rows: each caption's k most similar images of *other* products (two-tower order)."""
    k = min(k, len(product) - int(np.bincount(product).max()))
    s = np.where(product[:, None] == product[None, :], -np.inf, sim)
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable"), 1)


def rerank_stage_losses(logits: torch.Tensor, tower: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits, tower (B, 1 + k), the true image first -> (listwise, binary) losses."""
    target = torch.zeros(len(logits), dtype=torch.long)
    listwise = F.cross_entropy(logits + tower, target)
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1
    per_pair = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return listwise, (per_pair[:, 0].mean() + per_pair[:, 1:].mean()) / 2


def cross_encoder_parameters(model: FashionBert) -> list[torch.nn.Parameter]:
    """The weights only the cross-encoder uses: training them leaves the towers untouched."""
    if not model.config.separate_fusion:
        raise ValueError("the rerank stage needs the cross-encoder's own fusion layers (separate_fusion)")
    return list(model.fusion.parameters()) + list(model.tia.parameters())


def train_rerank_stage(model: FashionBert, data: SplitData, cfg, autocast, budget_s: float,
                       progress: bool = True) -> dict:
    """Train `model`'s cross-encoder weights in place for at most `budget_s` seconds (encoding
    included) or `cfg.rerank_epochs` passes over the captions. `cfg` is a TrainConfig."""
    from .train import PairScorer, _lr_factor  # train imports this module

    started = time.perf_counter()
    model.eval()
    with autocast():
        scorer = PairScorer(model, data)
        sim = scorer.similarity()
    # Inference tensors cannot take part in autograd: plain copies of the cached states.
    text_states, image_states = scorer.text_states.clone(), scorer.image_states.clone()
    del scorer
    tower_scale = float(model.itc.scale().detach())
    pool = rerank_candidates(sim, data.product, cfg.rerank_k)
    k = min(cfg.rerank_negatives, pool.shape[1])
    per_step = min(cfg.rerank_queries, len(data))
    steps_per_epoch = len(data) // per_step
    total = cfg.rerank_epochs * steps_per_epoch
    log.info("Rerank stage: %d captions encoded in %.0f s; training the cross-encoder on each against %d of its "
             "two-tower top %d, %d captions a step, for at most %d steps or %.1f minutes.", len(data),
             time.perf_counter() - started, k, pool.shape[1], per_step, total, budget_s / 60)

    params = cross_encoder_parameters(model)
    trainable = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in trainable and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    fusion = list(model.fusion.parameters())
    groups = [{"params": fusion, "base_lr": cfg.lr_backbone},
              {"params": [p for p in params if all(p is not f for f in fusion)], "base_lr": cfg.lr_new}]
    optimizer = torch.optim.AdamW([{**g, "lr": g["base_lr"]} for g in groups], weight_decay=cfg.weight_decay)
    model.train()
    step, hits, recent = 0, [], []
    bar = tqdm(total=total, desc="Rerank stage", disable=not progress, unit="step", mininterval=1.0)
    stopped = f"{cfg.rerank_epochs} passes done"
    try:
        while step < total:
            elapsed = time.perf_counter() - started
            if elapsed > budget_s:
                stopped = f"time budget of {budget_s / 60:.1f} minutes reached"
                break
            epoch, i = divmod(step, steps_per_epoch)
            order = np.random.default_rng([cfg.seed, epoch, 13]).permutation(len(data))
            queries = order[i * per_step : (i + 1) * per_step]
            rng = np.random.default_rng([cfg.seed, step, 17])
            negatives = np.stack([rng.choice(pool[q], k, replace=False) for q in queries])
            candidates = np.concatenate([queries[:, None], negatives], 1)  # (B, 1 + k), the true image first
            text_rows = np.repeat(queries, 1 + k)
            mask = data.mask[text_rows]
            width = int(mask.sum(1).max())
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * _lr_factor(max(step / total, elapsed / budget_s), cfg.warmup)
            with autocast():
                logits = model.match_logits_from(text_states[text_rows, :width], mask[:, :width],
                                                 image_states[candidates.reshape(-1)])
            logits = logits.float().view(len(queries), 1 + k)
            tower = torch.from_numpy(tower_scale * np.take_along_axis(sim[queries], candidates, 1)).float()
            listwise, binary = rerank_stage_losses(logits, tower)
            optimizer.zero_grad(set_to_none=True)
            (listwise + binary).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            optimizer.step()
            step += 1
            first = (logits + tower).argmax(1).eq(0).float().mean().item()
            recent.append(first)
            hits.append(first)
            if step % 10 == 0:
                bar.set_postfix_str(f"listwise={listwise.item():.3f} binary={binary.item():.3f} "
                                    f"true-first={np.mean(recent[-50:]):.2f}")
            bar.update(1)
    finally:
        bar.close()
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    tenth = max(1, len(hits) // 10)
    out = {"steps": step, "pairs": step * per_step * (1 + k), "minutes": round((time.perf_counter() - started) / 60, 2),
           "negatives": k, "top_k": int(pool.shape[1]), "stopped": stopped,
           # Share of lists whose true image the service's score put first, early and late in the stage.
           "true_first_first_tenth": round(float(np.mean(hits[:tenth])), 3) if hits else None,
           "true_first_last_tenth": round(float(np.mean(hits[-tenth:])), 3) if hits else None}
    log.info("Rerank stage: %d steps, %d pairs in %.1f minutes (%s); true image first in %.0f%% of the lists at "
             "the start, %.0f%% at the end.", step, out["pairs"], out["minutes"], stopped,
             100 * (out["true_first_first_tenth"] or 0), 100 * (out["true_first_last_tenth"] or 0))
    return out
