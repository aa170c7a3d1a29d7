"""`fashionbert export`: a trained run -> ONNX graphs a torch-free process serves (runtime/exported.py).

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
Given a catalog, each variant is timed at K = 20 and reranks the same lists fp32 reranks: the
two-tower top 20 of `select_queries` validation captions, as /search does; the default is the
fastest whose served R@1 on those lists is at most `max_r1_loss` points below fp32's.
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
from ..runtime.feature_store import FeatureStore
from .features import FeatureConfig, PatchFeatureExtractor
from ..runtime.exported import FORMAT, ExportedModel
from ..runtime.scoring import cross_weight, fused_scores
from ..atomic import replace_dir

log = logging.getLogger(__name__)
OPSET = 17
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


def export_module(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
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
        export_module(TextTower(model), (ids, mask), out / "text_tower.onnx", ["input_ids", "attention_mask"],
                ["embedding", "text_states"], {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                                               "embedding": {0: "batch"}, "text_states": {0: "batch", 1: "tokens"}})
        export_module(ImageTower(model, extractor), (pixels,), out / "image_tower.onnx", ["pixels"], ["embedding", "patch_states"],
                {"pixels": {0: "batch"}, "embedding": {0: "batch"}, "patch_states": {0: "batch"}})
        export_module(ImageHead(model), (torch.randn(2, c.num_patches, c.patch_dim),), out / "image_head.onnx", ["features"],
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


# Parity and the variant choice -------------------------------------------------------------------


def split_items(catalog_path: str, split: str) -> list:
    """One item (with its image) per product of the split: the paper protocol's unit."""
    catalog = open_catalog(catalog_path)
    keep = {r.id for r in _one_per_product(catalog.records(split))}
    return [it for it in catalog.items(split) if it.id in keep]


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


def bf16_support() -> str:
    """Whether this ONNX Runtime can run a bf16 MatMul on the CPU (the core of a bf16 variant)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.BFLOAT16, [2, 2]) for n in "aby"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "bf16", io[:2], io[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's NotImplemented has no importable base class
        return f"onnxruntime {ort.__version__} CPU: {str(exc).split(' : ')[-1]}"
    return "supported"


def protocol_ranks(score, product: np.ndarray, subcategory: np.ndarray, queries: int, negatives: int = 100,
                   seed: int = 0, bar=None) -> dict[str, np.ndarray]:
    """One paper-protocol draw over one row per product: the rank of each query's positive, both directions."""
    rng = np.random.default_rng([seed, 0])
    n = len(product)
    negatives = min(negatives, n - 1)
    chosen = rng.choice(n, min(queries, n), replace=False)
    ranks = {"t2i": [], "i2t": []}
    for q in chosen:
        same = np.flatnonzero((subcategory == subcategory[q]) & (np.arange(n) != q))
        negs = rng.choice(same, min(negatives, len(same)), replace=False)
        if len(negs) < negatives:
            rest = np.flatnonzero(subcategory != subcategory[q])
            negs = np.concatenate([negs, rng.choice(rest, negatives - len(negs), replace=False)])
        rows = np.concatenate([[q], negs])
        for d, (t, v) in (("t2i", (np.full(len(rows), q), rows)), ("i2t", (rows, np.full(len(rows), q)))):
            s = score(t, v)
            ranks[d].append(1 + int((s[1:] >= s[0]).sum()))
        if bar is not None:
            bar.update(1)
    return {d: np.array(r) for d, r in ranks.items()}


class VariantBench:
    """Real validation items encoded once by the exported towers; scores and times cross-encoder variants."""

    def __init__(self, model_dir: Path, items, threads: int | None = None):

        self.model_dir, self.threads = model_dir, threads
        base = ExportedModel(model_dir, variant="fp32", threads=threads)
        self.text = base.encode_text([it.caption for it in items])
        encoded = [base.encode_images(np.stack([it.image for it in items[i : i + 32]])) for i in range(0, len(items), 32)]
        self.image_emb = np.concatenate([e for e, _ in encoded])
        self.patch_states = np.concatenate([p for _, p in encoded])
        self.itc_scale = float(base.manifest["itc_scale"])
        self.cross_weight = float(base.manifest.get("cross_weight", 1.0))
        subcats = {s: i for i, s in enumerate(sorted({it.subcategory for it in items}))}
        self.subcategory = np.array([subcats[it.subcategory] for it in items])
        self.n = len(items)
        self.width = int(self.text.mask[0].sum())  # the probe query: item 0's caption, no padding
        self.sessions = {}

    def session(self, variant: str):

        if variant not in self.sessions:
            self.sessions[variant] = ExportedModel(self.model_dir, variant=variant, threads=self.threads)
        return self.sessions[variant]

    def quality(self, variant: str, queries: int, bar=None, seed: int = 0) -> dict[str, float]:
        """Paper-protocol R@1 both directions (one draw, 100 same-subcategory negatives)."""
        rt, text, states = self.session(variant), self.text, self.patch_states

        def score(t_rows, v_rows):
            width = int(text.mask[t_rows].sum(1).max())
            return rt.match_logits(text.states[t_rows, :width], text.mask[t_rows, :width], states[v_rows])

        ranks = protocol_ranks(score, np.arange(self.n), self.subcategory, queries, bar=bar, seed=seed)
        return {"t2i_R@1": float(np.mean(ranks["t2i"] == 1) * 100), "i2t_R@1": float(np.mean(ranks["i2t"] == 1) * 100)}

    def served_lists(self, k: int) -> np.ndarray:
        """(n, k) image rows: each caption's two-tower top k among the items, the list /search reranks."""
        sim = self.text.embedding @ self.image_emb.T
        return np.argsort(-sim, axis=1, kind="stable")[:, : min(k, self.n)]

    def served_top1(self, variant: str, lists: np.ndarray, bar=None) -> np.ndarray:
        """(n,) the image row each caption's rerank puts first: cross weight x logit + two-tower logit."""
        rt, out = self.session(variant), np.empty(len(lists), dtype=np.int64)
        for q, rows in enumerate(lists):
            cosines = self.image_emb[rows] @ self.text.embedding[q]
            logits = rt.rerank_logits(self.text, q, self.patch_states[rows])
            out[q] = rows[int(np.argmax(fused_scores(logits, cosines, self.itc_scale, self.cross_weight)))]
            if bar is not None:
                bar.update(1)
        return out

    def rerank_fn(self, variant: str):
        """A K-pair rerank of the probe query as the service runs it."""
        rt = self.session(variant)
        probe = np.resize(self.patch_states, (64, *self.patch_states.shape[1:]))  # tiled when there are few items
        return lambda k: rt.rerank_logits(self.text, 0, probe[:k])

    def torch_fn(self, model: FashionBert, bf16: bool = False):
        cross = CrossEncoder(model)
        probe = np.resize(self.patch_states, (64, *self.patch_states.shape[1:]))
        states = self.text.states[:1, : self.width]

        def run(k):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                cross(torch.from_numpy(np.repeat(states, k, 0)), torch.ones(k, self.width, dtype=torch.long),
                      torch.from_numpy(probe[:k]))

        return run


def time_side_by_side(contenders: dict, k: int, rounds: int = 5, per_block: int = 3) -> dict[str, float]:
    """Median ms per call of each contender, timed in interleaved blocks.

    Each block starts with an untimed call: the previous contender's thread pool (ONNX Runtime's
    or OpenMP's) may still be spinning, and would otherwise be charged to this one.
    """
    times = {n: [] for n in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            fn(k)
            for _ in range(per_block):
                start = time.perf_counter()
                fn(k)
                times[name].append((time.perf_counter() - start) * 1000)
    return {n: statistics.median(t) for n, t in times.items()}


def choose_variant(model_dir: Path, files: dict[str, str], items, model: FashionBert, cfg: ExportConfig,
                   progress: bool = True) -> tuple[str, dict]:
    """Time every variant, then rerank the same lists with fp32 and the others fastest first; the
    first whose served R@1 is within the tolerance of fp32's wins, and slower ones need no scoring.

    The lists are what /search reranks (each caption's two-tower top K among `select_queries`
    validation items), and the comparison is paired: every variant ranks the same lists, so a
    difference is the variant's, not the draw's.
    """
    torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
    if len(items) > cfg.select_queries:
        items = [items[i] for i in np.sort(np.random.default_rng(0).choice(len(items), cfg.select_queries, replace=False))]
    bench = VariantBench(model_dir, items, cfg.threads)
    contenders = {"torch": bench.torch_fn(model), **{n: bench.rerank_fn(n) for n in files}}
    ms = time_side_by_side(contenders, 20, rounds=3)
    report = {n: {"file": f, "rerank_k20_ms": round(ms[n], 2), "speedup_vs_torch_fp32": round(ms["torch"] / ms[n], 2)}
              for n, f in files.items()}
    lists = bench.served_lists(cfg.select_k)
    product = np.array([it.product_id for it in items])
    order = ["fp32"] + sorted((n for n in files if n != "fp32"), key=lambda n: ms[n])
    bar = tqdm(total=len(order) * len(lists), desc="Scoring cross-encoder variants", unit="query",
               disable=not progress, mininterval=1.0)
    best, reference = "fp32", None
    for name in order:
        if ms[name] >= ms[best] and name != "fp32":
            report[name]["scored"] = False  # slower than a variant already chosen
            continue
        top1 = bench.served_top1(name, lists, bar)
        reference = top1 if reference is None else reference
        r1 = float(np.mean(product[top1] == product) * 100)
        report[name].update(served_R1=round(r1, 2), top1_agreement=round(float(np.mean(top1 == reference)), 4))
        loss = report["fp32"]["served_R1"] - r1
        report[name].update(scored=True, r1_loss=round(loss, 2), eligible=loss <= cfg.max_r1_loss)
        if name != "fp32" and report[name]["eligible"]:
            best = name
    bar.total = bar.n  # variants left unscored shorten the run
    bar.close()
    return best, {"torch_eager_fp32_k20_ms": round(ms["torch"], 2), "queries": len(lists), "K": int(lists.shape[1]),
                  "items": len(items), "variants": report, "bf16": bf16_support()}


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
        _write_json(tmp / "manifest.json", manifest)

        from .tokenizer import CaptionTokenizer

        if catalog:
            tok = CaptionTokenizer(tmp / "tokenizer.json", c.max_text_len)
            items = split_items(catalog, cfg.split)
            manifest["parity"] = parity(model, extractor, ExportedModel(tmp, "fp32", cfg.threads), items[:16], tok)
            log.info("Parity with PyTorch fp32 on %d real items: max abs difference %.2g (logit %.2g).", min(16, len(items)),
                     max(manifest["parity"].values()), manifest["parity"]["logit"])
            if cfg.variant == "auto":
                best, report = choose_variant(tmp, variants, items, model, cfg, progress)
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
        _write_json(tmp / "manifest.json", manifest)
        replace_dir(tmp, out)
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
