"""The masks of the MLM and MPM tasks: whole words of a caption, patches of an image."""

from __future__ import annotations

import numpy as np
import torch

from ..runtime.tokenizer import CaptionTokenizer


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
