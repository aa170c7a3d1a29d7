"""Demo-generator and patch-feature throughput, side by side in one run.

    .venv/bin/python bench/features_throughput.py [--images 96] [--batch-size 32]

Prints a markdown table for BENCHMARKS.md. Each row is measured after one warm-up batch; the
modes, engines (PyTorch eager, ONNX Runtime) and precisions run in one process, one after another,
so their ratios are comparable.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from fashionbert.catalog.demo import _png
from fashionbert.catalog.demo_render import render
from fashionbert.catalog.demo_spec import make_spec
from fashionbert.model.features import FeatureConfig, OnnxPatchFeatureExtractor, PatchFeatureExtractor, cpu_supports_bf16


def generator_rate(n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        _png(render(make_spec(0, i)))
    return n / (time.perf_counter() - start)


def feature_rate(mode: str, engine: str, precision: str, images: np.ndarray, batch: int) -> float:
    config = FeatureConfig(mode)
    extractor = OnnxPatchFeatureExtractor(config) if engine == "onnxruntime" else PatchFeatureExtractor(config)
    extractor.extract(images[:batch], precision=precision)  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        extractor.extract(images[i : i + batch], precision=precision)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--generator-products", type=int, default=1000)
    parser.add_argument("--modes", default="grid,crop,global")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    images = np.stack([render(make_spec(0, i)) for i in range(args.images)])
    precisions = ["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"native bf16: {cpu_supports_bf16()}")
    print(f"\ndemo generator (render + PNG encode, one core): {generator_rate(args.generator_products):.0f} products/s\n")
    contenders = [("torch", p) for p in precisions] + [("onnxruntime", "fp32")]
    print("| mode | engine | precision | images/s | patches |")
    print("| --- | --- | --- | ---: | ---: |")
    for mode in args.modes.split(","):
        for engine, precision in contenders:
            rate = feature_rate(mode, engine, precision, images, args.batch_size)
            print(f"| {mode} | {engine} | {precision} | {rate:.1f} | {FeatureConfig(mode).patches} |", flush=True)


if __name__ == "__main__":
    main()
