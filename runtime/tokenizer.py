"""Captions -> token ids with the backbone's own WordPiece vocabulary (HF `tokenizers`; no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


@dataclass
class Encoded:
    ids: np.ndarray  # (B, T) int64, [CLS] text [SEP] then [PAD]
    mask: np.ndarray  # (B, T) int64, 1 for real tokens
    word_ids: list[list[int | None]]  # per token, the index of its word (None for specials and padding)


class CaptionTokenizer:
    def __init__(self, tokenizer_json: str | Path, max_len: int = 64):
        self.path = Path(tokenizer_json)
        self.tokenizer = Tokenizer.from_file(str(self.path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_len)
        self.max_len = max_len
        self.pad_id = self.tokenizer.token_to_id("[PAD]")
        self.mask_id = self.tokenizer.token_to_id("[MASK]")
        self.cls_id = self.tokenizer.token_to_id("[CLS]")
        self.sep_id = self.tokenizer.token_to_id("[SEP]")
        self.vocab_size = self.tokenizer.get_vocab_size()

    def __call__(self, texts: list[str], pad_to: int | None = None) -> Encoded:
        """Pad to the longest text of the batch (or `pad_to`): a single query carries no padding at all."""
        encodings = self.tokenizer.encode_batch(list(texts))
        width = pad_to or max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return Encoded(ids, mask, [e.word_ids + [None] * (width - len(e.ids)) for e in encodings])
