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
        self.lengths = data.mask.sum(1).numpy()
        image_states, v = [], []
        for i in range(0, len(data), batch):
            states = model.image_states(data.feats[i : i + batch].float())
            image_states.append(states)
            v.append(model.image_embedding_from(states))
        self.image_states, self.image_emb = torch.cat(image_states), torch.cat(v).float()
        # Captions of about one length a batch: less padding to encode. A row's states past its
        # batch's longest caption stay zero; nothing reads a row's states past its own length (the
        # joint pass packs each row's real tokens only).
        self.text_states = self.text_emb = None
        for rows in data.by_length(batch):
            ids, mask = data.texts(rows)
            states = model.text_states(ids, mask)
            emb = model.text_embedding_from(states, mask).float()
            if self.text_states is None:
                self.text_states = states.new_zeros(len(data), data.ids.shape[1], states.shape[2])
                self.text_emb = emb.new_empty(len(data), emb.shape[1])
            index = torch.from_numpy(rows)
            self.text_states[index, : ids.shape[1]] = states
            self.text_emb[index] = emb

    def similarity(self) -> np.ndarray:
        """Two-tower cosine of every caption (row) with every image (column), in fp32 even under autocast."""
        with torch.autocast(self.text_emb.device.type, enabled=False):
            return (self.text_emb @ self.image_emb.T).numpy()

    @torch.inference_mode()
    def logits(self, text_rows, image_rows, batch: int = 128) -> np.ndarray:
        """Cross-encoder match logit for each (text row, image row) pair; the pairs go through in
        batches of texts of about one length (less padding), each logit back in its pair's place."""
        text_rows, image_rows = np.asarray(text_rows, dtype=np.int64), np.asarray(image_rows, dtype=np.int64)
        out = np.zeros(len(text_rows), dtype=np.float32)
        order = np.argsort(self.lengths[text_rows], kind="stable")
        for i in range(0, len(order), batch):
            pairs = order[i : i + batch]
            t, v = text_rows[pairs], image_rows[pairs]
            mask = self.data.mask[t]
            width = int(mask.sum(1).max())
            out[pairs] = self.model.match_logits_from(self.text_states[t, :width], mask[:, :width],
                                                      self.image_states[v]).float().numpy()
        return out

    def __call__(self, text_rows, image_rows, batch: int = 128) -> np.ndarray:
        """Cross-encoder match probability for each (text row, image row) pair (float64: it saturates
        at 1 only beyond a logit of ~37, where float32 did beyond ~17)."""
        return sigmoid(self.logits(text_rows, image_rows, batch))
