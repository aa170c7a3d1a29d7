"""The exported model at serving time: ONNX Runtime sessions and the tokenizer, no torch.

A MODEL_DIR written by `fashionbert export` holds

- text_tower.onnx      token ids, mask -> embedding (B, E) and text states (B, T, H)
- image_tower.onnx     uint8 RGB pixels (B, 256, 256, 3) -> embedding (B, E) and patch states (B, P, H)
- image_head.onnx      the same above the CNN: cached patch features (B, P, D) -> embedding, patch states
- cross_encoder.*.onnx text states, mask, patch states -> match logit (B,), one file per variant
- tokenizer.json, manifest.json

"States" are the outputs of the layers below the fusion layers: a query's text states are
computed once by the text tower, each catalog image's patch states once at index time, and a
rerank pair then costs only the fusion layers (model/fashionbert.py explains the split).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..catalog.images import MODEL_IMAGE_SIZE
from .tokenizer import CaptionTokenizer

MANIFEST = "manifest.json"
FORMAT = "fashionbert-onnx/1"  # the manifest's "format": what this code reads and the export writes


class ModelError(ValueError):
    """MODEL_DIR is missing, incomplete or not an export this code can read."""


@dataclass
class TextBatch:
    embedding: np.ndarray  # (B, E) float32, L2-normalised
    states: np.ndarray  # (B, T, H) float32
    mask: np.ndarray  # (B, T) int64


def session_options(threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Three sessions (text, image, cross-encoder) share the cores: a pool that spins after its
    # run would steal a core from the next session's run.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def read_manifest(model_dir: str | Path) -> dict:
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not path.is_file():
        raise ModelError(f"{model_dir}: no {MANIFEST} (not a model exported by `fashionbert export`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise ModelError(f"{path}: unknown export format {manifest.get('format')!r}")
    return manifest


class ExportedModel:
    """The three graphs of one export. `variant` picks the cross-encoder (default: the manifest's choice)."""

    def __init__(self, model_dir: str | Path, variant: str | None = None, threads: int | None = None,
                 providers: list[str] | None = None):
        self.dir = Path(model_dir)
        self.manifest = read_manifest(self.dir)
        m = self.manifest
        self.variant = variant or m["default_variant"]
        variants = m["cross_encoder_variants"]
        if self.variant not in variants:
            raise ModelError(f"{self.dir}: no cross-encoder variant {self.variant!r} (has {', '.join(variants)})")
        files = {"text tower": m["text_tower"], "image tower": m["image_tower"], "cross-encoder": variants[self.variant],
                 "tokenizer": "tokenizer.json"}
        for what, name in files.items():
            if not (self.dir / name).is_file():
                raise ModelError(f"{self.dir}: the {what} file {name} is missing; export again")
        opts = session_options(threads)
        providers = providers or ["CPUExecutionProvider"]
        try:
            self.text = ort.InferenceSession(str(self.dir / files["text tower"]), opts, providers=providers)
            self.image = ort.InferenceSession(str(self.dir / files["image tower"]), opts, providers=providers)
            self.cross = ort.InferenceSession(str(self.dir / files["cross-encoder"]), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelError(f"{self.dir}: a graph failed to load ({exc})") from None
        # Exports before the image head have none: their index builds run the whole image tower.
        # Only index builds use it, so it loads on first use (a server never pays for it).
        self._head_file = self.dir / m["image_head"] if m.get("image_head") else None
        self._head_session, self._opts, self._providers = None, opts, providers
        self.feature_identity: dict = m.get("features") or {}
        self.tokenizer = CaptionTokenizer(self.dir / "tokenizer.json", m["max_text_len"])
        self.model_hash: str = m["model_hash"]
        self.embed_dim: int = m["embed_dim"]
        self.hidden_size: int = m["hidden_size"]
        self.num_patches: int = m["num_patches"]

    # Towers ------------------------------------------------------------------------------------

    def encode_text(self, texts: list[str]) -> TextBatch:
        enc = self.tokenizer(texts)
        emb, states = self.text.run(None, {"input_ids": enc.ids, "attention_mask": enc.mask})
        return TextBatch(emb, states, enc.mask)

    def encode_images(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, 256, 256, 3) model images -> embeddings (B, E) and patch states (B, P, H)."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if pixels.ndim != 4 or pixels.shape[1:] != (MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE, 3):
            raise ValueError(f"expected (B, {MODEL_IMAGE_SIZE}, {MODEL_IMAGE_SIZE}, 3) images, got {pixels.shape}")
        emb, patches = self.image.run(None, {"pixels": pixels})
        return emb, patches

    @property
    def image_head(self):
        """The image tower above the CNN (None for exports without one)."""
        if self._head_session is None and self._head_file is not None and self._head_file.is_file():
            try:
                self._head_session = ort.InferenceSession(str(self._head_file), self._opts, providers=self._providers)
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
                raise ModelError(f"{self.dir}: a graph failed to load ({exc})") from None
        return self._head_session

    def encode_features(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cached patch features (B, P, D) -> embeddings (B, E) and patch states (B, P, H), without the CNN."""
        if self.image_head is None:
            raise ModelError(f"{self.dir}: this export has no image head; export again to index from cached features")
        emb, patches = self.image_head.run(None, {"features": np.ascontiguousarray(features, dtype=np.float32)})
        return emb, patches

    # Cross-encoder -----------------------------------------------------------------------------

    def match_logits(self, text_states: np.ndarray, mask: np.ndarray, patch_states: np.ndarray) -> np.ndarray:
        """(B, T, H), (B, T), (B, P, H) -> (B,) match logits."""
        (logits,) = self.cross.run(None, {"text_states": np.ascontiguousarray(text_states, dtype=np.float32),
                                          "attention_mask": np.ascontiguousarray(mask, dtype=np.int64),
                                          "patch_states": np.ascontiguousarray(patch_states, dtype=np.float32)})
        return logits

    def rerank_jobs(self, jobs: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Several reranks in one cross-encoder run. Each job: one caption's unpadded text states (T, H)
        against K items' patch states (K, P, H); the captions are padded to the longest, and each
        job gets back its (K,) logits."""
        sizes = [len(patches) for _, patches in jobs]
        width = max(len(states) for states, _ in jobs)
        text = np.zeros((sum(sizes), width, jobs[0][0].shape[-1]), dtype=np.float32)
        mask = np.zeros((sum(sizes), width), dtype=np.int64)
        row = 0
        for (states, _), k in zip(jobs, sizes):
            text[row : row + k, : len(states)] = states
            mask[row : row + k, : len(states)] = 1
            row += k
        logits = self.match_logits(text, mask, np.concatenate([patches for _, patches in jobs]))
        return np.split(logits, np.cumsum(sizes)[:-1])

    def rerank_logits(self, text: TextBatch, row: int, patch_states: np.ndarray) -> np.ndarray:
        """One query (row `row` of `text`) against K items' patch states (K, P, H) -> (K,) logits."""
        width = int(text.mask[row].sum())
        return self.rerank_jobs([(text.states[row, :width], patch_states)])[0]
