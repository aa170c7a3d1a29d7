"""The rerank stage: the last minutes of `fashionbert train` train the cross-encoder alone, on the
candidates a search hands it.

After the multitask training, the towers are fixed and the cross-encoder's own weights (its copy
of the fusion layers and the TIA head) are trained on training captions, each against its true
image and negatives drawn from the K images of other products nearest to it by two-tower
similarity over the *whole* training set (at most MAX_ROWS rows): the lists the service
reranks. Captions come in a shuffled order, `rerank_steps` steps of them (on the demo catalog, the
default 400 steps reach half of the 4,800). The loss is the multitask TIA loss (model/losses.py)
with the fused listwise part always on: a softmax over each list of
the service's score (cross-encoder logit + the fixed two-tower logit), so the cross-encoder learns
what the towers get wrong, plus the balanced match / no-match term that keeps /match's
probability calibrated.

Why a stage of its own: below the fusion layers every caption and image is encoded once, up
front, so a pair costs only the two fusion layers; a multitask step spends most of its time on
the towers, MLM and MPM. On the demo catalog the stage trains the cross-encoder on more pairs than
the whole multitask run does.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from tqdm import tqdm

from .config import TrainConfig
from .data import SplitData
from .fashionbert import FashionBert
from .losses import tia_losses
from .optim import lr_factor
from .pair_scorer import PairScorer

log = logging.getLogger(__name__)
MAX_ROWS = 8000  # training rows the stage encodes and draws from (a random subset of larger catalogs)


def rerank_candidates(text_emb: torch.Tensor, image_emb: torch.Tensor, product: np.ndarray, k: int,
                      block: int = 512) -> np.ndarray:
    """(N, k) rows: for each caption (row of `text_emb`), the k images of *other* products it is most
    similar to, in two-tower order; computed a block of captions at a time (never N x N at once)."""
    k = min(k, len(product) - int(np.bincount(product).max()))
    out = np.empty((len(product), max(k, 0)), dtype=np.int64)
    if k <= 0:
        return out
    for i in range(0, len(product), block):
        s = (text_emb[i : i + block] @ image_emb.T).float().numpy()
        s[product[i : i + block, None] == product[None, :]] = -np.inf
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        out[i : i + block] = np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable"), 1)
    return out


def cross_encoder_parameters(model: FashionBert) -> list[torch.nn.Parameter]:
    """The weights only the cross-encoder uses: training them leaves the towers untouched."""
    if not model.config.separate_fusion:
        raise ValueError("the rerank stage needs the cross-encoder's own fusion layers (separate_fusion)")
    return list(model.fusion.parameters()) + list(model.tia.parameters())


def train_rerank_stage(model: FashionBert, data: SplitData, cfg: TrainConfig, autocast, progress: bool = True) -> dict:
    """Train `model`'s cross-encoder weights in place for `cfg.rerank_steps` steps, at most
    `cfg.rerank_epochs` passes over the captions (and, if set, `cfg.rerank_max_minutes`, encoding
    included). The lists are always ranked by the fused score (the service's order), whatever
    `cfg.fused_listwise` says."""
    budget_s = cfg.rerank_max_minutes * 60 if cfg.rerank_max_minutes else None

    params = cross_encoder_parameters(model)  # fails early for a model without its own fusion layers
    started = time.perf_counter()
    if len(data) > MAX_ROWS:
        # Each row's states cost 2 x ~98 KB in memory; the default minutes reach ~2,300 captions anyway.
        data = data.subset(np.sort(np.random.default_rng([cfg.seed, 19]).choice(len(data), MAX_ROWS, replace=False)))
    model.eval()
    with autocast():
        scorer = PairScorer(model, data)
    # Inference tensors cannot take part in autograd: plain copies of the cached states.
    text_states, image_states = scorer.text_states.clone(), scorer.image_states.clone()
    text_emb, image_emb = scorer.text_emb, scorer.image_emb
    del scorer
    tower_scale = float(model.itc.scale().detach())
    pool = rerank_candidates(text_emb, image_emb, data.product, cfg.rerank_k)
    k = min(cfg.rerank_negatives, pool.shape[1])
    per_step = min(cfg.rerank_queries, len(data))
    steps_per_epoch = len(data) // per_step
    total = min(cfg.rerank_steps, cfg.rerank_epochs * steps_per_epoch) if k else 0
    encoded = time.perf_counter() - started
    if not k:
        log.warning("Rerank stage skipped: no training caption has an image of another product to rank against.")
        return {"steps": 0, "pairs": 0, "minutes": round(encoded / 60, 2), "negatives": 0, "top_k": 0,
                "stopped": "no negatives", "planned_steps": 0, "cut": False, "true_first_first_tenth": None,
                "true_first_last_tenth": None}
    log.info("Rerank stage: %d captions encoded in %.0f s; training the cross-encoder on them, each against %d of "
             "the %d images of other products nearest to it by two-tower similarity, %d captions a step, %d steps%s.",
             len(data), encoded, k, pool.shape[1], per_step, total,
             f" (cut at {budget_s / 60:g} minutes if not done by then)" if budget_s else "")

    trainable = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in trainable and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    groups = [{"params": list(model.fusion.parameters()), "base_lr": cfg.lr_backbone},
              {"params": list(model.tia.parameters()), "base_lr": cfg.lr_new}]
    optimizer = torch.optim.AdamW([{**g, "lr": g["base_lr"]} for g in groups], weight_decay=cfg.weight_decay)
    model.train()
    step, hits = 0, []
    bar = tqdm(total=total, desc="Rerank stage", disable=not progress, unit="step", mininterval=1.0)
    stopped = f"{total} steps done" + ("" if total == cfg.rerank_steps else f" ({cfg.rerank_epochs} passes over the captions)")
    train_started = time.perf_counter()
    train_budget = max(budget_s - encoded, 1e-6) if budget_s else None
    try:
        while step < total:
            elapsed = time.perf_counter() - train_started  # the schedule runs over the training part only
            if train_budget and elapsed > train_budget:
                stopped = f"cut by the wall-clock cap of {budget_s / 60:g} minutes after {step} of {total} steps"
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
                g["lr"] = g["base_lr"] * lr_factor(step, total, cfg.warmup, elapsed, train_budget)
            with autocast():
                logits = model.match_logits_from(text_states[text_rows, :width], mask[:, :width],
                                                 image_states[candidates.reshape(-1)])
            logits = logits.float().view(len(queries), 1 + k)
            cand = torch.from_numpy(candidates)
            tower = tower_scale * (text_emb[torch.from_numpy(queries)][:, None] * image_emb[cand]).sum(-1)
            listwise, binary = tia_losses(logits, tower)
            optimizer.zero_grad(set_to_none=True)
            (listwise + binary).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            optimizer.step()
            step += 1
            hits.append((logits + tower).argmax(1).eq(0).float().mean().item())
            if step % 10 == 0:
                bar.set_postfix_str(f"listwise={listwise.item():.3f} binary={binary.item():.3f} "
                                    f"true-first={np.mean(hits[-50:]):.2f}")
            bar.update(1)
    finally:
        bar.close()
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    if step < total:
        log.warning("The rerank stage was cut by its %g-minute cap (--rerank-max-minutes) after %d of its %d steps: its "
                    "learning rate was fitted into that time, and the cross-encoder is weaker than the full stage's.",
                    cfg.rerank_max_minutes, step, total)
    tenth = max(1, len(hits) // 10)
    out = {"steps": step, "pairs": step * per_step * (1 + k), "minutes": round((time.perf_counter() - started) / 60, 2),
           "negatives": k, "top_k": int(pool.shape[1]), "stopped": stopped, "planned_steps": total, "cut": step < total,
           # Share of lists whose true image the service's score put first, early and late in the stage.
           "true_first_first_tenth": round(float(np.mean(hits[:tenth])), 3) if hits else None,
           "true_first_last_tenth": round(float(np.mean(hits[-tenth:])), 3) if hits else None}
    log.info("Rerank stage: %d steps, %d pairs in %.1f minutes (%s); true image first in %.0f%% of the lists at "
             "the start, %.0f%% at the end.", step, out["pairs"], out["minutes"], stopped,
             100 * (out["true_first_first_tenth"] or 0), 100 * (out["true_first_last_tenth"] or 0))
    return out
