"""Cross-encoder rerank cost per pair for several trained runs, measured side by side in one process.

    .venv/bin/python bench/rerank_cost.py data/runs/default data/runs/layers2 [--k 20] [--repeats 15]

For each run: one caption against K catalog images, PyTorch eager, fp32 and bf16 autocast;
median over repeats, runs interleaved so that machine noise hits them alike. "serving" is what
a /search rerank costs: the caption's states once, the images' states precomputed at index
time, then the fusion layers over K pairs. "full" runs every layer for every pair, as a
cross-encoder without stored states must.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from fashionbert.model.fashionbert import load_model
from fashionbert.model.features import cpu_supports_bf16
from fashionbert.runtime.tokenizer import CaptionTokenizer

CAPTION = ("Navy and white vertical-stripe long sleeve shirt. Cotton poplin shirt in navy with white vertical stripes, "
           "featuring a spread collar and a patch pocket at the chest. Slim fit.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    models = {}
    for run in args.runs:
        model, _ = load_model(Path(run) / "model")
        tok = CaptionTokenizer(Path(run) / "model" / "tokenizer.json", model.config.max_text_len)
        enc = tok([CAPTION] * args.k)
        feats = torch.rand(args.k, model.config.num_patches, model.config.patch_dim)
        models[run] = (model, torch.from_numpy(enc.ids), torch.from_numpy(enc.mask), feats)
    precisions = ["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"]
    times = {(run, p, how): [] for run in models for p in precisions for how in ("serving", "full")}
    with torch.inference_mode():
        states = {run: m.image_states(f) for run, (m, _, _, f) in models.items()}
        for _ in range(args.repeats + 1):
            for run, (model, ids, mask, feats) in models.items():
                for p in precisions:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p == "bf16"):
                        start = time.perf_counter()
                        text = model.text_states(ids[:1], mask[:1]).expand(args.k, -1, -1)
                        model.match_logits_from(text, mask, states[run])
                        times[(run, p, "serving")].append(time.perf_counter() - start)
                        start = time.perf_counter()
                        model.match_logits(ids, mask, feats)
                        times[(run, p, "full")].append(time.perf_counter() - start)
    print(f"| run | layers (fusion) | patches | sequence | precision | pass | ms per query (K={args.k}) | ms per pair |")
    print("| --- | --- | ---: | ---: | --- | --- | ---: | ---: |")
    for (run, p, how), t in times.items():
        model, ids, _, feats = models[run]
        ms = statistics.median(t[1:]) * 1000
        print(f"| {run} | {model.config.num_layers} ({min(model.config.fusion_layers, model.config.num_layers)}) | "
              f"{feats.shape[1]} | {ids.shape[1] + feats.shape[1]} | {p} | {how} | {ms:.1f} | {ms / args.k:.2f} |")


if __name__ == "__main__":
    main()
