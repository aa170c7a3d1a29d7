"""The export's choice of the default cross-encoder variant, by measuring each one.

Each variant is timed at K = 20 and reranks the same lists fp32 reranks: the two-tower top
`select_k` of `select_queries` validation captions, as /search does; the default is the fastest
whose served R@1 on those lists is at most `max_r1_loss` points below fp32's. bench/rerank_variants.py
reuses `VariantBench` and `time_side_by_side` for its tables.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
import numpy as np
import torch
from tqdm import tqdm

from .fashionbert import FashionBert
from .onnx_export import OPSET
from .onnx_graphs import CrossEncoder
from ..runtime.exported import ExportedModel
from ..runtime.scoring import fused_scores


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
        self.n = len(items)
        self.width = int(self.text.mask[0].sum())  # the probe query: item 0's caption, no padding
        self.sessions = {}

    def session(self, variant: str):
        if variant not in self.sessions:
            self.sessions[variant] = ExportedModel(self.model_dir, variant=variant, threads=self.threads)
        return self.sessions[variant]

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
        """The same rerank by the PyTorch model, eager (the reference the speed-ups are against)."""
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


def choose_variant(model_dir: Path, files: dict[str, str], items, model: FashionBert, select_queries: int = 200,
                   select_k: int = 20, max_r1_loss: float = 1.0, threads: int | None = None,
                   progress: bool = True) -> tuple[str, dict]:
    """Time every variant, then rerank the same lists with fp32 and the others fastest first; the
    first whose served R@1 is within the tolerance of fp32's wins, and slower ones need no scoring.

    The lists are what /search reranks (each caption's two-tower top K among `select_queries`
    validation items), and the comparison is paired: every variant ranks the same lists, so a
    difference is the variant's, not the draw's.
    """
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    if len(items) > select_queries:
        items = [items[i] for i in np.sort(np.random.default_rng(0).choice(len(items), select_queries, replace=False))]
    bench = VariantBench(model_dir, items, threads)
    contenders = {"torch": bench.torch_fn(model), **{n: bench.rerank_fn(n) for n in files}}
    ms = time_side_by_side(contenders, 20, rounds=3)
    report = {n: {"file": f, "rerank_k20_ms": round(ms[n], 2), "speedup_vs_torch_fp32": round(ms["torch"] / ms[n], 2)}
              for n, f in files.items()}
    lists = bench.served_lists(select_k)
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
        report[name].update(scored=True, r1_loss=round(loss, 2), eligible=loss <= max_r1_loss)
        if name != "fp32" and report[name]["eligible"]:
            best = name
    bar.total = bar.n  # variants left unscored shorten the run
    bar.close()
    return best, {"torch_eager_fp32_k20_ms": round(ms["torch"], 2), "queries": len(lists), "K": int(lists.shape[1]),
                  "items": len(items), "variants": report, "bf16": bf16_support()}



#####CMD
