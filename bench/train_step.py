"""Seconds per training step, split into forward, adaptive-weight solve, backward and optimiser,
for several training settings side by side in one process.

    .venv/bin/python bench/train_step.py --catalog data/demo [--steps 6] [--variants default,dropout-0.1,cross-24]
    .venv/bin/python bench/train_step.py --catalog data/demo --variants default --steps 2 --profile 25

--profile N also runs the first variant's steps under torch.profiler and prints its N costliest
operators by self CPU time (where a step's time goes, operator by operator).

Each variant builds the default model from the pre-trained backbone, runs one warm-up step and
then `--steps` timed steps on the same batches of the demo catalog's training split (real patch
features), with the precision training would use. Variants are interleaved step by step, so
that noise on this shared machine hits them alike. The table is the mean per part (a variant that solves
the loss weights every few steps pays for its solves on some steps only; use a multiple of that
many steps).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fashionbert.catalog.readers import open_catalog
from fashionbert.model.adaptive_loss import AdaptiveLossWeights
from fashionbert.model.data import SplitData, load_split
from fashionbert.model.batches import epoch_batches
from fashionbert.model.config import TrainConfig, new_model
from fashionbert.model.fashionbert import default_backbone
from fashionbert.runtime.feature_store import FeatureStore, default_features_path
from fashionbert.model.features import resolve_precision
from fashionbert.runtime.tokenizer import CaptionTokenizer
from fashionbert.model.losses import step_losses
from fashionbert.model.optim import param_groups

# The recipe before 2026-12-03: loss weights solved every step, no frozen layers, 8 masked pairs, 64 patch tokens.
PREVIOUS = {"weights_every": 1, "frozen_layers": 0, "masked_texts": 8, "patch_pool": 1}
VARIANTS = {
    "default": {},
    "previous": PREVIOUS,
    "dropout-0.1": {"dropout": 0.1},  # BERT's dropout, on attention weights and hidden states
    "cross-24": {"cross_texts": 24, "tia_negatives": 4, "hard_negatives": 3},
    "fixed-weights": {"loss_weighting": "fixed"},  # no per-task gradient norms
    "cross-12": {"cross_texts": 12},  # the default before the rerank stage: 3x the cross-encoder pairs
    "nondeterministic": {"deterministic": False},  # PyTorch's faster-but-unordered kernels allowed
    # Each of today's three savings alone, on the previous recipe:
    "weights-every-4": {**PREVIOUS, "weights_every": 4},  # the adaptive weights solved on one step in four
    "frozen-2": {**PREVIOUS, "frozen_layers": 2},  # embeddings and 2 lowest layers fixed, captions' states cached
    "masked-4": {**PREVIOUS, "masked_texts": 4},  # half the MLM/MPM pairs
    "lean": {"weights_every": 4, "frozen_layers": 2, "masked_texts": 4, "patch_pool": 1},  # all three: the default of 2026-12-03
    "frozen-3": {"frozen_layers": 3},  # the default with 3 of the 4 tower layers fixed
    "patches-64": {"patch_pool": 1},  # the default with all 64 patch tokens (before 2026-12-08) instead of 16
}
PARTS = ("forward", "adaptive", "backward", "optimiser")


class Runner:
    def __init__(self, name: str, overrides: dict, data: SplitData, tok: CaptionTokenizer, precision: str):
        self.name, cfg = name, TrainConfig(**overrides)
        self.data, self.tok = data, tok
        torch.manual_seed(0)
        model, _ = new_model(cfg, num_patches=data.feats.shape[1], patch_dim=data.feats.shape[2])
        self.cfg = replace(cfg, frozen_layers=cfg.frozen_for(model.config.unimodal_layers), patch_pool=cfg.pool)
        if self.cfg.frozen_layers:  # as the loop does: once per run, before the first step
            self.data = replace(data, text_cache=model.eval().lower_text_states(data.ids, data.mask,
                                                                                self.cfg.frozen_layers))
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(param_groups(model, self.cfg), weight_decay=self.cfg.weight_decay)
        self.weighting = AdaptiveLossWeights(list(self.cfg.tasks), self.cfg.loss_weighting)
        self.batches = epoch_batches(self.data, self.cfg, 0)
        self.bf16 = precision == "bf16"
        self.times: dict[str, list[float]] = {p: [] for p in PARTS}

    def step(self, i: int, record: bool) -> None:
        torch.use_deterministic_algorithms(self.cfg.deterministic, warn_only=True)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            losses = step_losses(self.model, self.data, self.batches[i], self.cfg, self.tok, np.random.default_rng(i))
        t1 = time.perf_counter()
        weights = self.weighting.current(losses) if i % self.cfg.weights_every else None
        weights = weights or self.weighting.update(losses, self.model.last_shared_weight())
        t2 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.weighting.combine(losses, weights).backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.optimizer.step()
        t4 = time.perf_counter()
        if record:
            for part, d in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                self.times[part].append(d)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--catalog", default="data/demo")
    parser.add_argument("--features", help="default: features/grid.h5 beside the catalog")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (use a multiple of weights_every)")
    parser.add_argument("--variants", default="default,cross-12,dropout-0.1,cross-24,fixed-weights",
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile the first variant's timed steps and print its N costliest operators")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    precision = resolve_precision("auto", torch.device("cpu"))
    catalog = open_catalog(args.catalog)
    features = Path(args.features) if args.features else default_features_path(args.catalog, "grid")
    # One copy of the data for all variants (none of them changes the tokenizer or the text length).
    tok = CaptionTokenizer(default_backbone() / "tokenizer.json", TrainConfig().max_text_len)
    with FeatureStore(features) as store:
        data = load_split(catalog, "train", store, tok, {}, limit=1000)
    runners = [Runner(n, VARIANTS[n], data, tok, precision) for n in names]
    for i in range(args.steps + 1):
        for r in runners:
            r.step(i, record=i > 0)  # step 0 warms up
    print(f"Training step, {precision}, {torch.get_num_threads()} threads, mean of {args.steps} steps (seconds)\n")
    print("| variant | " + " | ".join(PARTS) + " | step | vs first row |")
    print("| --- |" + " ---: |" * (len(PARTS) + 2))
    base = None
    for r in runners:
        med = {p: statistics.mean(r.times[p]) for p in PARTS}
        total = statistics.mean([sum(x) for x in zip(*(r.times[p] for p in PARTS))])
        base = base or total
        print(f"| {r.name} | " + " | ".join(f"{med[p]:.3f}" for p in PARTS) + f" | {total:.3f} | {total / base:.2f}× |")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        first = runners[0]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(1, args.steps + 1):
                first.step(i, record=False)
        print(f"\n{first.name}: the {args.profile} costliest operators over {args.steps} profiled steps\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile, max_name_column_width=48))


if __name__ == "__main__":
    main()
