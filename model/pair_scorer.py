"""`PairScorer`: the cross-encoder over (text, image) pairs of one split, as a rerank runs it."""

from __future__ import annotations

import numpy as np
import torch

from .data import SplitData
from .fashionbert import FashionBert
from ..runtime.scoring import sigmoid


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
        """Cross-encoder match probability for each (text row, image row) pair (float64: it saturates
        at 1 only beyond a logit of ~37, where float32 did beyond ~17)."""
        return sigmoid(self.logits(text_rows, image_rows, batch))
