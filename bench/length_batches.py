"""What batching captions by length buys the inference passes of training and evaluation.

    .venv/bin/python bench/length_batches.py --run data/runs/default --catalog data/demo [--pairs 6000] [--repeats 2]

With a trained run's model on a split (validation by default), times three passes two ways,
interleaved, the median of `--repeats`: captions in batches of similar length
(`SplitData.by_length`, what the code does) and in the split's order, each batch trimmed to its
longest caption, except `PairScorer`'s encoding, which took every caption at the split's full
width (what the code did before): the text tower's embeddings of every caption
(neighbourhood batches, once an epoch), `PairScorer`'s encoding of every caption and image (the
rerank stage, validation, calibration, evaluation), and `--pairs` cross-encoder logits in one call, 10 images per
caption (only calls that mix captions gain: calibration's, 20 per caption, the matching check's
and the paper protocol's image-to-text lists; validation and the full gallery score one caption
a call). It also says whether the two ways gave bit-for-bit the same numbers. Precision: what training picks (`auto`), or `--precision`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from fashionbert.catalog.readers import open_catalog
from fashionbert.model.batches import caption_embeddings
from fashionbert.model.data import SplitData, load_split
from fashionbert.model.fashionbert import load_model
from fashionbert.model.features import resolve_precision
from fashionbert.model.pair_scorer import PairScorer
from fashionbert.runtime.feature_store import FeatureStore, default_features_path
from fashionbert.runtime.tokenizer import CaptionTokenizer


def split_order(self: SplitData, batch: int) -> list[np.ndarray]:
    return [np.arange(i, min(len(self), i + batch)) for i in range(0, len(self), batch)]


def passes(model, data: SplitData, texts: np.ndarray, images: np.ndarray, autocast, in_order: bool) -> tuple[dict, tuple]:
    times = {}
    with torch.inference_mode(), autocast():
        start = time.perf_counter()
        emb = caption_embeddings(model, data)
        times["caption embeddings"] = time.perf_counter() - start
        start = time.perf_counter()
        if in_order:  # as before: every caption at the split's full width
            with mock.patch.object(SplitData, "texts", lambda self, rows: (self.ids[rows], self.mask[rows])):
                scorer = PairScorer(model, data)
        else:
            scorer = PairScorer(model, data)
        times["PairScorer encoding"] = time.perf_counter() - start
        start = time.perf_counter()
        if in_order:  # 128 pairs at a time as given: each batch as wide as its longest caption
            logits = np.concatenate([scorer.logits(texts[i : i + 128], images[i : i + 128]) for i in range(0, len(texts), 128)])
        else:
            logits = scorer.logits(texts, images)
        times[f"{len(texts)} cross-encoder logits"] = time.perf_counter() - start
    return times, (emb, scorer.text_emb.numpy(), scorer.image_emb.numpy(), logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True, warn_only=True)  # as training runs
    model, _ = load_model(Path(args.run) / "model")
    catalog = open_catalog(args.catalog)
    with FeatureStore(default_features_path(args.catalog, "grid")) as store:
        tok = CaptionTokenizer(Path(args.run) / "model" / "tokenizer.json", model.config.max_text_len)
        data = load_split(catalog, args.split, store, tok, {})
    precision = resolve_precision(args.precision, torch.device("cpu"))
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")  # noqa: E731
    per_caption = 10
    texts = np.repeat(np.arange(min(len(data), args.pairs // per_caption)), per_caption)
    images = np.random.default_rng(0).integers(0, len(data), len(texts))
    lengths = data.mask.sum(1).numpy()
    print(f"{len(data)} captions of {lengths.min()}-{lengths.max()} tokens (mean {lengths.mean():.1f}), {precision}, "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    passes(model, data.subset(np.arange(min(len(data), 128))), texts[:100] % 128, images[:100] % 128, autocast,
           in_order=False)  # warm-up, untimed: the first pass pays for allocations and kernel choices
    timings = {"by length": [], "split order": []}
    outputs = {}
    for _ in range(args.repeats):
        for way in timings:
            if way == "split order":
                with mock.patch.object(SplitData, "by_length", split_order):
                    t, outputs[way] = passes(model, data, texts, images, autocast, in_order=True)
            else:
                t, outputs[way] = passes(model, data, texts, images, autocast, in_order=False)
            timings[way].append(t)
    same = all(np.array_equal(a, b) for a, b in zip(outputs["by length"], outputs["split order"]))
    print("\n| pass | split order (s) | by length (s) | ratio |\n| --- | ---: | ---: | ---: |")
    for name in timings["by length"][0]:
        old = statistics.median(t[name] for t in timings["split order"])
        new = statistics.median(t[name] for t in timings["by length"])
        print(f"| {name} | {old:.2f} | {new:.2f} | {new / old:.2f}× |")
    print(f"\nEmbeddings and logits bit for bit the same both ways: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
