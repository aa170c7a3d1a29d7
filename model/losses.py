"""The task losses of one training step (MLM, MPM, TIA, ITC), and TIA's two terms, which the
rerank stage (model/rerank_stage.py) trains with too.

One step, on a batch of products drawn a few subcategories (or neighbourhoods) at a time, so
in-batch negatives are fine-grained ones (model/batches.py):

1. ITC: text tower and image tower over the whole batch, symmetric InfoNCE.
2. TIA: for the first `cross_texts` texts, the cross-encoder sees the true image, the batch's
   hardest negatives by two-tower similarity and random other products of the same subcategory;
   binary cross-entropy plus a listwise softmax over each text's candidates. The pairs reuse the
   towers' states below the fusion layers, so each pair costs only the fusion layers.
3. MLM and MPM: one more joint pass over the true pairs with 15% of the words masked (whole
   words) and 10% of the patches zeroed (model/masking.py).

The adaptive rule (model/adaptive_loss.py) weights them; the loop (model/train.py) sums them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .batches import pick_negatives
from .config import TrainConfig
from .data import SplitData
from .fashionbert import FashionBert
from .masking import mask_patches, whole_word_mask
from ..runtime.tokenizer import CaptionTokenizer


def contrastive_loss(t: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE at inverse temperature `scale`; other images of the same product are neither
    positives nor negatives."""
    logits = scale * t @ v.T
    logits = logits.masked_fill(same & ~torch.eye(len(t), dtype=torch.bool), float("-inf"))
    target = torch.arange(len(t))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def tia_losses(logits: torch.Tensor, tower: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """TIA's two terms, shared by the multitask step and the rerank stage. logits (B, 1 + k), the
    true image first; `tower` the fixed two-tower logits added for the listwise ranking -> the
    listwise softmax over each row, and the binary cross-entropy with positives and negatives
    counting equally."""
    target = torch.zeros(len(logits), dtype=torch.long)
    listwise = F.cross_entropy(logits + tower, target)
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1
    per_pair = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return listwise, (per_pair[:, 0].mean() + per_pair[:, 1:].mean()) / 2


def step_losses(model: FashionBert, data: SplitData, rows: np.ndarray, cfg: TrainConfig, tok: CaptionTokenizer,
                rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """The task losses of one batch (rows of `data`)."""
    ids, mask = data.texts(rows)
    feats = model.patch_embeddings.pool(data.feats[rows].float())  # (B, P, D): MPM masks and predicts these
    product, subcat = data.product[rows], data.subcategory[rows]
    losses: dict[str, torch.Tensor] = {}

    # Each text and image is encoded once below the fusion layers; the towers and the
    # cross-encoder's pairs all start from these states.
    if cfg.frozen_layers and data.text_cache is not None:  # the frozen lower layers' states, computed once per run
        text_states = model.text_states(ids, mask, cfg.frozen_layers, data.text_cache[rows][:, : ids.shape[1]])
    else:
        text_states = model.text_states(ids, mask)  # (B, T, H)
    image_states = model.image_states(feats)  # (B, P, H)
    t = model.text_embedding_from(text_states, mask)  # (B, E)
    v = model.image_embedding_from(image_states)  # (B, E)
    if "itc" in cfg.tasks:
        same = torch.from_numpy(product[:, None] == product[None, :])
        losses["itc"] = contrastive_loss(t, v, model.itc.scale(), same)

    c, k = cfg.cross_texts, cfg.tia_negatives
    if "tia" in cfg.tasks:
        negs = pick_negatives(t @ v.T, product, subcat, c, k, rng, cfg.hard_negatives)  # (c, k) rows of the batch
        neg_states = image_states[negs.reshape(-1)]
        # Pairs: c true pairs, then text 0 with its k negatives, text 1 with its k, ...
        text_rows = np.concatenate([np.arange(c), np.repeat(np.arange(c), k)])
        logits = model.match_logits_from(text_states[text_rows], mask[text_rows], torch.cat([image_states[:c], neg_states]))
        # Binary (positives and negatives counting equally), and listwise: each text's true image
        # against its k negatives, a softmax over k + 1 logits. It says "this one rather than
        # those", a stronger signal per pair than k + 1 yes/no answers.
        ranked = torch.cat([logits[:c, None], logits[c:].view(c, k)], 1)  # (c, 1 + k), the true image first
        tower = 0.0
        if cfg.fused_listwise:
            with torch.no_grad():
                candidates = v[torch.from_numpy(np.concatenate([np.arange(c)[:, None], negs], 1))]  # (c, 1 + k, E)
                tower = model.itc.scale() * (t[:c, None] * candidates).sum(-1)
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
