"""Rerank speed and quality of the exported cross-encoder variants against PyTorch, side by side in one run.

    .venv/bin/python bench/rerank_variants.py --run data/runs/default --model data/model [--catalog data/demo]

Speed: one real validation caption against K real stored patch states, as a /search rerank runs
it (text states once, the fusion layers over K pairs); contenders timed in interleaved blocks
(model/variant_choice.py: time_side_by_side), medians. Achieved GFLOP/s counts the matrix products of
the fusion layers and is set against this machine's dense matrix-product peak, measured in the
same run. Quality: paper-protocol R@1 of every variant on the same draw (one draw, 100
same-subcategory negatives, `--queries` per direction), so differences are paired.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fashionbert.model.export import split_items
from fashionbert.model.fashionbert import load_model
from fashionbert.model.features import cpu_supports_bf16
from fashionbert.model.protocol import protocol_ranks
from fashionbert.model.variant_choice import VariantBench, time_side_by_side


def protocol_r1(bench: VariantBench, subcategory: np.ndarray, variant: str, queries: int, seed: int = 0) -> dict[str, float]:
    """Paper-protocol R@1 of a variant, both directions: one draw, 100 same-subcategory negatives
    (model/protocol.py), over the bench's items (one per product), scored by the variant's logit."""
    rt, text, states = bench.session(variant), bench.text, bench.patch_states

    def score(t_rows, v_rows):
        width = int(text.mask[t_rows].sum(1).max())
        return rt.match_logits(text.states[t_rows, :width], text.mask[t_rows, :width], states[v_rows])

    ranks = protocol_ranks(score, np.arange(bench.n), subcategory, queries, seed=seed)
    return {"t2i_R@1": float(np.mean(ranks["t2i"] == 1) * 100), "i2t_R@1": float(np.mean(ranks["i2t"] == 1) * 100)}


def gemm_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    a = torch.rand(n, n)
    b = torch.rand(n, n)
    out = {}
    contenders = {"numpy fp32": (a.numpy(), b.numpy()), "torch fp32": (a, b)}
    if cpu_supports_bf16():
        contenders["torch bf16"] = (a.bfloat16(), b.bfloat16())
    # ONNX Runtime's own MatMul (MLAS), the kernel the exported graphs run on.
    import onnxruntime as ort
    from onnx import TensorProto, helper

    io_ = [helper.make_tensor_value_info(v, TensorProto.FLOAT, [n, n]) for v in "aby"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "mm", io_[:2], io_[2:])
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
                                .SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"a": a.numpy(), "b": b.numpy()}

    class _Ort:
        def __matmul__(self, _):
            return sess.run(None, feed)

    contenders["onnxruntime fp32"] = (_Ort(), None)
    for name, (x, y) in contenders.items():
        x @ y
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            best = min(best, time.perf_counter() - start)
        out[name] = 2 * n**3 / best / 1e9
    return out


def pair_flops(text_len: int, patches: int, hidden: int, ffn: int, layers: int) -> float:
    """Matrix-product FLOPs of one pair through the fusion layers (projections, attention, feed-forward)."""
    seq = text_len + patches
    return layers * (2 * seq * (4 * hidden * hidden + 2 * hidden * ffn) + 2 * 2 * seq * seq * hidden)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--catalog", help="default: the run's catalog")
    parser.add_argument("--ks", default="10,20,50")
    parser.add_argument("--queries", type=int, default=400, help="paper-protocol queries per direction (0: skip)")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    catalog = args.catalog or json.loads((Path(args.run) / "summary.json").read_text())["catalog"]
    manifest = json.loads((Path(args.model) / "manifest.json").read_text())
    torch_model, _ = load_model(Path(args.run) / "model")
    torch_model.float().eval()

    items = split_items(catalog, "validation")
    bench = VariantBench(Path(args.model), items)
    subcats = {s: i for i, s in enumerate(sorted({it.subcategory for it in items}))}
    subcategory = np.array([subcats[it.subcategory] for it in items])
    contenders = {"PyTorch eager fp32": bench.torch_fn(torch_model)}
    if cpu_supports_bf16():
        contenders["PyTorch eager bf16 autocast"] = bench.torch_fn(torch_model, bf16=True)
    for v in manifest["cross_encoder_variants"]:
        contenders[f"ONNX Runtime {v}"] = bench.rerank_fn(v)
    peak = gemm_peak()
    ms = {k: time_side_by_side(contenders, k) for k in ks}

    c = torch_model.config
    fusion = min(c.fusion_layers, c.num_layers)
    flops = pair_flops(bench.width, c.num_patches, c.hidden_size, c.intermediate_size, fusion)
    best_peak = max(v for k, v in peak.items() if "fp32" in k)
    print(f"Machine: {platform.machine()}, {threads} threads; {time.strftime('%Y-%m-%d')}; one caption of {bench.width} "
          f"tokens + {c.num_patches} patches, {fusion} fusion layers: {flops / 1e9:.2f} GFLOP of matrix products per pair.")
    print("Dense matrix-product peak (2048^3, best of 5): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()))
    print()
    print("| contender | " + " | ".join(f"K={k} ms" for k in ks) + " | " + " | ".join(f"K={k} pairs/s" for k in ks)
          + " | K=20 vs eager fp32 | K=20 GFLOP/s (share of fp32 peak) |")
    print("| --- |" + " ---: |" * (2 * len(ks) + 2))
    for name in contenders:
        cells = [f"{ms[k][name]:.1f}" for k in ks] + [f"{k / ms[k][name] * 1000:.0f}" for k in ks]
        gflops = 20 * flops / (ms[20][name] / 1000) / 1e9
        cells += [f"{ms[20]['PyTorch eager fp32'] / ms[20][name]:.2f}x", f"{gflops:.0f} ({gflops / best_peak * 100:.0f} %)"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.queries:
        print()
        print(f"Paper protocol, one draw of {min(args.queries, bench.n)} queries per direction over the {bench.n} validation "
              f"products (101 candidates each); default variant in the export: {manifest['default_variant']}.")
        print()
        print("| variant | T2I R@1 | I2T R@1 | change vs fp32 (T2I / I2T) |")
        print("| --- | ---: | ---: | ---: |")
        ref = None
        for v in manifest["cross_encoder_variants"]:
            q = protocol_r1(bench, subcategory, v, args.queries)
            ref = ref or q
            print(f"| {v} | {q['t2i_R@1']:.2f} | {q['i2t_R@1']:.2f} | {q['t2i_R@1'] - ref['t2i_R@1']:+.2f} / "
                  f"{q['i2t_R@1'] - ref['i2t_R@1']:+.2f} |")
        print(f"| bf16 | - | - | {manifest.get('selection', {}).get('bf16', 'not measured')} |")


if __name__ == "__main__":
    main()
