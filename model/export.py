"""`fashionbert export`: a trained run -> ONNX graphs a torch-free process serves (runtime/exported.py).

The graphs and the cross-encoder's variants: model/onnx_graphs.py. Given a catalog (the run's by
default), the export checks the fp32 graphs against PyTorch on real items (`parity`) and picks
the default cross-encoder variant by measuring each (model/variant_choice.py); the manifest
records both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import staged_dir, write_text
from ..catalog.readers import open_catalog
from .data import first_row_per_product
from .fashionbert import FashionBert, load_model
from .features import FeatureConfig, PatchFeatureExtractor
from .onnx_export import OPSET
from .onnx_graphs import VARIANTS, CrossEncoder, ImageTower, TextTower, export_graphs, make_variants
from .variant_choice import choose_variant
from ..runtime.exported import FORMAT, ExportedModel
from ..runtime.feature_store import FeatureStore
from ..runtime.scoring import cross_weight
from ..runtime.tokenizer import CaptionTokenizer

log = logging.getLogger(__name__)


@dataclass
class ExportConfig:
    catalog: str | None = None  # real items for the parity check and the variant choice (default: the run's)
    split: str = "validation"
    # The variant choice: this many validation captions, each reranking its two-tower top
    # `select_k` as /search does. Bounded in work (the whole export of a CI-sized model, 160
    # captions: 50 s on a 2-core AVX2 CPU, BENCHMARKS.md).
    select_queries: int = 200
    select_k: int = 20
    max_r1_loss: float = 1.0  # points of served R@1 a faster variant may lose against fp32 on those lists
    variant: str = "auto"  # or one of VARIANTS: skip the choice
    threads: int | None = None


def file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_items(catalog_path: str, split: str) -> list:
    """One item (with its image) per product of the split: the paper protocol's unit."""
    catalog = open_catalog(catalog_path)
    records = catalog.records(split)
    keep = {records[i].id for i in first_row_per_product([r.product_id for r in records])}
    return [it for it in catalog.items(split) if it.id in keep]


def parity(model: FashionBert, extractor: PatchFeatureExtractor, runtime, items, tokenizer) -> dict[str, float]:
    """Max |PyTorch fp32 - ONNX Runtime fp32| per output on real items (captions of varied length)."""
    enc = tokenizer([it.caption for it in items])
    pixels = np.stack([it.image for it in items])
    with torch.no_grad():
        t_emb, t_states = TextTower(model)(torch.from_numpy(enc.ids), torch.from_numpy(enc.mask))
        v_emb, v_states = ImageTower(model, extractor)(torch.from_numpy(pixels))
        # Each caption with the next item's image: true pairs and mismatches alike.
        perm = np.roll(np.arange(len(items)), 1)
        logits = CrossEncoder(model)(t_states, torch.from_numpy(enc.mask), v_states[perm])
    o_text = runtime.encode_text([it.caption for it in items])
    o_emb, o_states = runtime.encode_images(pixels)
    o_logits = runtime.match_logits(o_text.states, o_text.mask, o_states[perm])
    m = enc.mask.astype(bool)
    return {"text_embedding": float(np.abs(o_text.embedding - t_emb.numpy()).max()),
            "text_states": float(np.abs(o_text.states[m] - t_states.numpy()[m]).max()),
            "image_embedding": float(np.abs(o_emb - v_emb.numpy()).max()),
            "patch_states": float(np.abs(o_states - v_states.numpy()).max()),
            "logit": float(np.abs(o_logits - logits.numpy()).max())}


# The command -------------------------------------------------------------------------------------


def export(run: str | Path, out: str | Path, cfg: ExportConfig = ExportConfig(), overwrite: bool = False,
           progress: bool = True) -> dict:
    run, out = Path(run), Path(out)
    if cfg.select_queries < 1 or cfg.select_k < 2:
        raise ValueError("--select-queries must be at least 1 (and select_k at least 2)")
    if cfg.variant != "auto" and cfg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {cfg.variant!r}: use auto or one of {', '.join(VARIANTS)}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite to replace it")
    model, meta = load_model(run / "model")
    model.float().eval()
    train_cfg = meta.get("train", {})
    mode = train_cfg.get("feature_mode", "grid")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    catalog = cfg.catalog or summary.get("catalog")
    if catalog:
        open_catalog(catalog)  # a wrong path fails now, not after the export
    # The image tower must cut crops the way the training features were made.
    crop_size = 64
    if summary.get("features") and Path(summary["features"]).is_file():
        with FeatureStore(summary["features"]) as store:
            crop_size = int(store.attrs.get("crop_size", 64))
    extractor = PatchFeatureExtractor(FeatureConfig(mode=mode, crop_size=crop_size)).eval()
    start = time.perf_counter()

    with staged_dir(out) as tmp:  # `out` is replaced in one step when all of it is written
        log.info("Exporting the text tower, image tower and cross-encoder of %s to ONNX.", run)
        files = export_graphs(model, extractor, tmp)
        variants = {"fp32": files.pop("fp32")}
        if cfg.variant != "fp32":
            variants = make_variants(tmp, model)
        shutil.copy(run / "model" / "tokenizer.json", tmp / "tokenizer.json")
        c = model.config
        manifest = {
            "format": FORMAT, "model_hash": file_hash(run / "model" / "model.safetensors"), "run": str(run.resolve()),
            "text_tower": files["text_tower"], "image_tower": files["image_tower"], "image_head": files["image_head"],
            # What the image head's input must be: cached features made exactly so (runtime/feature_store.py).
            "features": {**extractor.config.as_attrs(), "precision": "fp32"},
            "cross_encoder_variants": variants, "default_variant": "fp32",
            "embed_dim": c.embed_dim, "hidden_size": c.hidden_size, "layers": c.num_layers,
            "fusion_layers": min(c.fusion_layers, c.num_layers), "num_patches": c.num_patches,
            "patch_dim": c.patch_dim, "feature_mode": mode,
            "itc_scale": float(model.itc.scale().detach()), "cross_weight": cross_weight(meta),
            "max_text_len": c.max_text_len, "image_size": 256,
            "opset": OPSET, "versions": _versions(), "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_text(tmp / "manifest.json", json.dumps(manifest, indent=2))  # ExportedModel(tmp) reads it below
        if catalog:
            tok = CaptionTokenizer(tmp / "tokenizer.json", c.max_text_len)
            items = split_items(catalog, cfg.split)
            manifest["parity"] = parity(model, extractor, ExportedModel(tmp, "fp32", cfg.threads), items[:16], tok)
            log.info("Parity with PyTorch fp32 on %d real items: max abs difference %.2g (logit %.2g).", min(16, len(items)),
                     max(manifest["parity"].values()), manifest["parity"]["logit"])
            if cfg.variant == "auto":
                best, report = choose_variant(tmp, variants, items, model, cfg.select_queries, cfg.select_k,
                                              cfg.max_r1_loss, cfg.threads, progress)
                manifest["default_variant"], manifest["selection"] = best, report
                r = report["variants"][best]
                log.info("Default cross-encoder: %s (rerank of 20 in %.1f ms, %.2fx PyTorch eager fp32; on %d validation "
                         "captions' top %d, served R@1 %.1f against fp32's %.1f, the same first item in %.1f%%).", best,
                         r["rerank_k20_ms"], r["speedup_vs_torch_fp32"], report["queries"], report["K"], r["served_R1"],
                         report["variants"]["fp32"]["served_R1"], 100 * r["top1_agreement"])
        elif cfg.variant == "auto":
            log.warning("No catalog to measure the variants on: the default cross-encoder stays fp32.")
        if cfg.variant not in ("auto",):
            manifest["default_variant"] = cfg.variant
        write_text(tmp / "manifest.json", json.dumps(manifest, indent=2))
    manifest["seconds"] = round(time.perf_counter() - start, 1)
    log.info("Export written to %s in %.0f s.", out, manifest["seconds"])
    return manifest


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}
