"""The ONNX graphs of a trained model, and the faster variants of the cross-encoder's.

Graphs (fp32, opset 17, dynamic batch and text length):

- text tower     input_ids, attention_mask -> embedding, text_states
- image tower    pixels (uint8, B x 256 x 256 x 3) -> embedding, patch_states; it contains the
                 EfficientNet-Lite0 and the colour statistics, so serving needs no torch
- image head     the image tower above the CNN: cached patch features -> embedding, patch_states
                 (an index build reuses the features training computed instead of running the CNN again)
- cross-encoder  text_states, attention_mask, patch_states -> logit

The cross-encoder reads the text tower's states rather than token ids: a search computes them
once and reuses them for all K pairs, so a pair costs only the fusion layers.

Cross-encoder variants (the rerank is where the time goes): `fp32`; `optimized` (ONNX Runtime's
transformer optimizer); `int8` and `optimized-int8` (dynamic int8 quantization of every weight
matrix); `mixed-int8` (int8 except the last layer's projections into the match head).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .fashionbert import FashionBert
from .onnx_export import export_module

if TYPE_CHECKING:  # only named (the extractor is handed in): this module needs nothing of features.py
    from .features import PatchFeatureExtractor

log = logging.getLogger(__name__)
VARIANTS = ("fp32", "optimized", "int8", "optimized-int8", "mixed-int8")


class TextTower(nn.Module):
    def __init__(self, model: FashionBert):
        super().__init__()
        self.m = model
        # Wrappers start in eval mode: torch.onnx.export restores the wrapper's mode afterwards,
        # recursively, and a wrapper left in training mode would switch dropout back on.
        self.eval()

    def forward(self, input_ids, attention_mask):
        states = self.m.text_states(input_ids, attention_mask)
        return self.m.text_embedding_from(states, attention_mask), states


class ImageTower(nn.Module):
    def __init__(self, model: FashionBert, extractor: PatchFeatureExtractor):
        super().__init__()
        self.m, self.extractor = model, extractor
        self.eval()

    def forward(self, pixels):
        feats = self.extractor(pixels)
        states = self.m.image_states(feats)
        return self.m.image_embedding_from(states), states


class ImageHead(nn.Module):
    """The image tower above the CNN: cached patch features -> embedding, patch states. An index
    build over a catalog whose features training already computed runs only this."""

    def __init__(self, model: FashionBert):
        super().__init__()
        self.m = model
        self.eval()

    def forward(self, features):
        states = self.m.image_states(features)
        return self.m.image_embedding_from(states), states


class CrossEncoder(nn.Module):
    def __init__(self, model: FashionBert):
        super().__init__()
        self.m = model
        self.eval()

    def forward(self, text_states, attention_mask, patch_states):
        return self.m.match_logits_from(text_states, attention_mask, patch_states)


def export_graphs(model: FashionBert, extractor: PatchFeatureExtractor, out: Path) -> dict[str, str]:
    """The three fp32 graphs into `out`; returns their file names."""
    c = model.config
    ids = torch.tensor([[101, 2304, 3797, 102], [101, 2417, 102, 0]])
    mask = (ids != 0).long()
    pixels = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    states = torch.randn(2, 4, c.hidden_size)
    patches = torch.randn(2, c.num_patches, c.hidden_size)
    with torch.no_grad():
        export_module(TextTower(model), (ids, mask), out / "text_tower.onnx", ["input_ids", "attention_mask"],
                ["embedding", "text_states"], {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                                               "embedding": {0: "batch"}, "text_states": {0: "batch", 1: "tokens"}})
        export_module(ImageTower(model, extractor), (pixels,), out / "image_tower.onnx", ["pixels"], ["embedding", "patch_states"],
                {"pixels": {0: "batch"}, "embedding": {0: "batch"}, "patch_states": {0: "batch"}})
        export_module(ImageHead(model), (torch.randn(2, c.feature_patches, c.patch_dim),), out / "image_head.onnx", ["features"],
                ["embedding", "patch_states"], {"features": {0: "batch"}, "embedding": {0: "batch"}, "patch_states": {0: "batch"}})
        export_module(CrossEncoder(model), (states, mask, patches), out / "cross_encoder.fp32.onnx",
                ["text_states", "attention_mask", "patch_states"], ["logit"],
                {"text_states": {0: "pairs", 1: "tokens"}, "attention_mask": {0: "pairs", 1: "tokens"},
                 "patch_states": {0: "pairs"}, "logit": {0: "pairs"}})
    return {"text_tower": "text_tower.onnx", "image_tower": "image_tower.onnx", "image_head": "image_head.onnx",
            "fp32": "cross_encoder.fp32.onnx"}


def mixed_int8_nodes(graph) -> list[str]:
    """The weight products mixed-int8 quantizes: every fusion layer but the last in full, and the
    last one's feed-forward expansion. The last layer's attention and output projections write
    the states the match head reads, so they stay fp32."""
    weights = [n.name for n in graph.node if n.op_type == "MatMul" and "/attention/self/MatMul" not in n.name
               and n.name.startswith(("/encoder/layer.", "/fusion/layer."))]
    last = max(int(n.split("/")[2].split(".")[1]) for n in weights)
    return [n for n in weights if f"/layer.{last}/" not in n or "/intermediate/" in n]


def make_variants(out: Path, model: FashionBert) -> dict[str, str]:
    """The faster cross-encoder variants beside the fp32 one; returns name -> file."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    c = model.config
    files = {"fp32": "cross_encoder.fp32.onnx"}
    with _quiet_root_logger():  # both tools log every node at INFO on the root logger
        optimized = optimize_model(str(out / files["fp32"]), model_type="bert", num_heads=c.num_heads,
                                   hidden_size=c.hidden_size, opt_level=1, use_gpu=False)
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        optimized.save_model_to_file(str(out / "cross_encoder.optimized.onnx"))
        files["optimized"] = "cross_encoder.optimized.onnx"
        mixed = mixed_int8_nodes(onnx.load(str(out / files["fp32"])).graph)
        for source, name, nodes in (("fp32", "int8", None), ("optimized", "optimized-int8", None),
                                    ("fp32", "mixed-int8", mixed)):
            target = f"cross_encoder.{name}.onnx"
            # Per-channel scales (one per output column of each weight matrix): on the demo model
            # per-tensor scales lost more R@1 at the same speed. DefaultTensorType: the optimizer's
            # fused ops (com.microsoft domain) defeat shape inference; their outputs are float.
            quantize_dynamic(str(out / files[source]), str(out / target), weight_type=QuantType.QInt8, per_channel=True,
                             nodes_to_quantize=nodes, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            files[name] = target
    log.info("Cross-encoder variants written; the transformer optimizer fused %s.",
             ", ".join(f"{v} {k}" for k, v in fused.items()) or "nothing")
    return files


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
