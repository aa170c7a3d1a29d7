"""`fashionbert export`: a trained run -> ONNX graphs a torch-free process serves (index/runtime.py).

Graphs (fp32, opset 17, dynamic batch and text length):

- text tower     input_ids, attention_mask -> embedding, text_states
- image tower    pixels (uint8, B x 256 x 256 x 3) -> embedding, patch_states; it contains the
                 EfficientNet-Lite0 and the colour statistics, so serving needs no torch
- cross-encoder  text_states, attention_mask, patch_states -> logit

The cross-encoder reads the text tower's states rather than token ids: a search computes them
once and reuses them for all K pairs, so a pair costs only the fusion layers.

Cross-encoder variants (the rerank is where the time goes): `fp32`; `optimized` (ONNX Runtime's
transformer optimizer); `int8` and `optimized-int8` (dynamic int8 quantization of the weights).
Given a catalog, each variant is scored on a paper-protocol draw and timed at K = 20; the
default is the fastest that loses at most `max_r1_loss` points of R@1 in either direction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..catalog.readers import open_catalog
from .fashionbert import FashionBert, load_model
from .features import FeatureConfig, PatchFeatureExtractor

log = logging.getLogger(__name__)
OPSET = 17
VARIANTS = ("fp32", "optimized", "int8", "optimized-int8")
FORMAT = "fashionbert-onnx/1"


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


class CrossEncoder(nn.Module):
    def __init__(self, model: FashionBert):
        super().__init__()
        self.m = model
        self.eval()

    def forward(self, text_states, attention_mask, patch_states):
        return self.m.match_logits_from(text_states, attention_mask, patch_states)


@dataclass
class ExportConfig:
    catalog: str | None = None  # real items for the parity check and the variant choice (default: the run's)
    split: str = "validation"
    select_queries: int = 100  # paper-protocol queries per direction for the variant choice
    max_r1_loss: float = 1.0
    variant: str = "auto"  # or one of VARIANTS: skip the choice
    threads: int | None = None


def file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python-level shape arithmetic
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)


def export_graphs(model: FashionBert, extractor: PatchFeatureExtractor, out: Path) -> dict[str, str]:
    """The three fp32 graphs into `out`; returns their file names."""
    c = model.config
    ids = torch.tensor([[101, 2304, 3797, 102], [101, 2417, 102, 0]])
    mask = (ids != 0).long()
    pixels = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    states = torch.randn(2, 4, c.hidden_size)
    patches = torch.randn(2, c.num_patches, c.hidden_size)
    with torch.no_grad():
        _export(TextTower(model), (ids, mask), out / "text_tower.onnx", ["input_ids", "attention_mask"],
                ["embedding", "text_states"], {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                                               "embedding": {0: "batch"}, "text_states": {0: "batch", 1: "tokens"}})
        _export(ImageTower(model, extractor), (pixels,), out / "image_tower.onnx", ["pixels"], ["embedding", "patch_states"],
                {"pixels": {0: "batch"}, "embedding": {0: "batch"}, "patch_states": {0: "batch"}})
        _export(CrossEncoder(model), (states, mask, patches), out / "cross_encoder.fp32.onnx",
                ["text_states", "attention_mask", "patch_states"], ["logit"],
                {"text_states": {0: "pairs", 1: "tokens"}, "attention_mask": {0: "pairs", 1: "tokens"},
                 "patch_states": {0: "pairs"}, "logit": {0: "pairs"}})
    return {"text_tower": "text_tower.onnx", "image_tower": "image_tower.onnx", "fp32": "cross_encoder.fp32.onnx"}


def make_variants(out: Path, model: FashionBert) -> dict[str, str]:
    """The faster cross-encoder variants beside the fp32 one; returns name -> file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    import onnx

    c = model.config
    files = {"fp32": "cross_encoder.fp32.onnx"}
    with _quiet_root_logger():  # both tools log every node at INFO on the root logger
        optimized = optimize_model(str(out / files["fp32"]), model_type="bert", num_heads=c.num_heads,
                                   hidden_size=c.hidden_size, opt_level=1, use_gpu=False)
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        optimized.save_model_to_file(str(out / "cross_encoder.optimized.onnx"))
        files["optimized"] = "cross_encoder.optimized.onnx"
        for source, name in (("fp32", "int8"), ("optimized", "optimized-int8")):
            target = f"cross_encoder.{name}.onnx"
            # The optimizer's fused ops (com.microsoft domain) defeat shape inference: say their outputs are float.
            quantize_dynamic(str(out / files[source]), str(out / target), weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
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


# Parity and the variant choice -------------------------------------------------------------------


def _val_inputs(catalog_path: str, split: str, tokenizer, limit: int, seed: int = 0):
    """Real items of the split: captions tokenised and model images, `limit` products at most."""
    catalog = open_catalog(catalog_path)
    records = catalog.records(split)
    keep = {r.id for r in _one_per_product(records)[:limit]}
    items = [it for it in catalog.items(split) if it.id in keep]
    return items


def _one_per_product(records):
    seen, out = set(), []
    for r in records:
        if r.product_id not in seen:
            seen.add(r.product_id)
            out.append(r)
    return out


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


def time_rerank(fn, k: int, repeats: int = 7) -> float:
    """Median milliseconds of one rerank of k pairs (after a warm-up call)."""
    fn(k)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(k)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def protocol_ranks(score, product: np.ndarray, subcategory: np.ndarray, queries: int, negatives: int = 100,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """One paper-protocol draw over one row per product: the rank of each query's positive, both directions."""
    rng = np.random.default_rng([seed, 0])
    n = len(product)
    chosen = rng.choice(n, min(queries, n), replace=False)
    ranks = {"t2i": [], "i2t": []}
    for q in chosen:
        same = np.flatnonzero((subcategory == subcategory[q]) & (np.arange(n) != q))
        negs = rng.choice(same, min(negatives, len(same)), replace=False)
        if len(negs) < negatives:
            rest = np.flatnonzero((subcategory != subcategory[q]))
            negs = np.concatenate([negs, rng.choice(rest, negatives - len(negs), replace=False)])
        rows = np.concatenate([[q], negs])
        for d, (t, v) in (("t2i", (np.full(len(rows), q), rows)), ("i2t", (rows, np.full(len(rows), q)))):
            s = score(t, v)
            ranks[d].append(1 + int((s[1:] >= s[0]).sum()))
    return {d: np.array(r) for d, r in ranks.items()}


def choose_variant(model_dir: Path, files: dict[str, str], items, model: FashionBert, cfg: ExportConfig,
                   progress: bool = True) -> tuple[str, dict]:
    from ..index.runtime import ExportedModel

    report: dict[str, dict] = {}
    base = ExportedModel(model_dir, variant="fp32", threads=cfg.threads)
    captions = [it.caption for it in items]
    text = base.encode_text(captions)
    pixels = np.stack([it.image for it in items])
    patch_states = np.concatenate([base.encode_images(pixels[i : i + 32])[1] for i in range(0, len(items), 32)])
    subcats = {s: i for i, s in enumerate(sorted({it.subcategory for it in items}))}
    subcategory = np.array([subcats[it.subcategory] for it in items])
    product = np.arange(len(items))

    # A K = 20 rerank of one real query, as the service runs it.
    probe_states = np.resize(patch_states, (20, *patch_states.shape[1:]))  # tiled when there are fewer items

    def torch_rerank(k, mod=CrossEncoder(model)):
        width = int(text.mask[0].sum())
        with torch.no_grad():
            mod(torch.from_numpy(np.repeat(text.states[:1, :width], k, 0)), torch.ones(k, width, dtype=torch.long),
                torch.from_numpy(probe_states[:k]))

    torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
    eager_ms = time_rerank(torch_rerank, 20)
    for name in tqdm(files, desc="Cross-encoder variants", unit="variant", disable=not progress):
        rt = ExportedModel(model_dir, variant=name, threads=cfg.threads)

        def score(t_rows, v_rows, rt=rt):
            width = int(text.mask[t_rows].sum(1).max())
            return rt.match_logits(text.states[t_rows, :width], text.mask[t_rows, :width], patch_states[v_rows])

        ranks = protocol_ranks(score, product, subcategory, cfg.select_queries)
        ms = time_rerank(lambda k: rt.rerank_logits(text, 0, probe_states[:k]), 20)
        report[name] = {"file": files[name], "t2i_R@1": float(np.mean(ranks["t2i"] == 1) * 100),
                        "i2t_R@1": float(np.mean(ranks["i2t"] == 1) * 100), "rerank_k20_ms": round(ms, 2),
                        "speedup_vs_torch_fp32": round(eager_ms / ms, 2)}
    ref = report["fp32"]
    for r in report.values():
        r["r1_loss"] = round(max(ref["t2i_R@1"] - r["t2i_R@1"], ref["i2t_R@1"] - r["i2t_R@1"]), 2)
        r["eligible"] = r["r1_loss"] <= cfg.max_r1_loss
    best = min((n for n, r in report.items() if r["eligible"]), key=lambda n: report[n]["rerank_k20_ms"])
    return best, {"torch_eager_fp32_k20_ms": round(eager_ms, 2), "queries_per_direction": int(min(cfg.select_queries, len(items))),
                  "candidates": 101, "items": len(items), "variants": report}


# The command -------------------------------------------------------------------------------------


def export(run: str | Path, out: str | Path, cfg: ExportConfig = ExportConfig(), overwrite: bool = False,
           progress: bool = True) -> dict:
    run, out = Path(run), Path(out)
    if cfg.variant != "auto" and cfg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {cfg.variant!r}: use auto or one of {', '.join(VARIANTS)}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite to replace it")
    model, meta = load_model(run / "model")
    model.float().eval()
    train_cfg = meta.get("train", {})
    mode = train_cfg.get("feature_mode", "grid")
    summary = run / "summary.json"
    catalog = cfg.catalog or (json.loads(summary.read_text()).get("catalog") if summary.is_file() else None)
    crop_size = 64
    extractor = PatchFeatureExtractor(FeatureConfig(mode=mode, crop_size=crop_size)).eval()
    start = time.perf_counter()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        log.info("Exporting the text tower, image tower and cross-encoder of %s to ONNX.", run)
        files = export_graphs(model, extractor, tmp)
        variants = {"fp32": files.pop("fp32")}
        if cfg.variant != "fp32":
            variants = make_variants(tmp, model)
        shutil.copy(run / "model" / "tokenizer.json", tmp / "tokenizer.json")
        c = model.config
        manifest = {
            "format": FORMAT, "model_hash": file_hash(run / "model" / "model.safetensors"), "run": str(run.resolve()),
            "text_tower": files["text_tower"], "image_tower": files["image_tower"],
            "cross_encoder_variants": variants, "default_variant": "fp32",
            "embed_dim": c.embed_dim, "hidden_size": c.hidden_size, "layers": c.num_layers,
            "fusion_layers": min(c.fusion_layers, c.num_layers), "num_patches": c.num_patches,
            "patch_dim": c.patch_dim, "feature_mode": mode, "max_text_len": c.max_text_len, "image_size": 256,
            "opset": OPSET, "versions": _versions(), "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _write_json(tmp / "manifest.json", manifest)

        from ..index.runtime import ExportedModel
        from .tokenizer import CaptionTokenizer

        if catalog:
            tok = CaptionTokenizer(tmp / "tokenizer.json", c.max_text_len)
            items = _val_inputs(catalog, cfg.split, tok, max(cfg.select_queries * 4, 200))
            manifest["parity"] = parity(model, extractor, ExportedModel(tmp, "fp32", cfg.threads), items[:16], tok)
            log.info("Parity with PyTorch fp32 on %d real items: max abs difference %.2g (logit %.2g).", min(16, len(items)),
                     max(manifest["parity"].values()), manifest["parity"]["logit"])
            if cfg.variant == "auto":
                best, report = choose_variant(tmp, variants, items, model, cfg, progress)
                manifest["default_variant"], manifest["selection"] = best, report
                r = report["variants"][best]
                log.info("Default cross-encoder: %s (rerank of 20 in %.1f ms, %.2fx PyTorch eager fp32; R@1 %.1f/%.1f "
                         "against fp32's %.1f/%.1f).", best, r["rerank_k20_ms"], r["speedup_vs_torch_fp32"], r["t2i_R@1"],
                         r["i2t_R@1"], report["variants"]["fp32"]["t2i_R@1"], report["variants"]["fp32"]["i2t_R@1"])
        elif cfg.variant == "auto":
            log.warning("No catalog to measure the variants on: the default cross-encoder stays fp32.")
        if cfg.variant not in ("auto",):
            manifest["default_variant"] = cfg.variant
        _write_json(tmp / "manifest.json", manifest)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest["seconds"] = round(time.perf_counter() - start, 1)
    log.info("Export written to %s in %.0f s.", out, manifest["seconds"])
    return manifest


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}
