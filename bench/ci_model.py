"""The CI model's quality checks, for several seeds or recipes, without the test suite around them.

    .venv/bin/python bench/ci_model.py --seeds 0,1,2,3 [--set rerank_epochs=10 --set epochs=8]

Runs what the suite's session fixtures run (tests/conftest.py: the 150-product demo catalog, the
CI training config, export, index) and prints, per seed, the numbers the model-quality tests
assert on: validation captions with their product in the top 10 (recall order and reranked; the
test asks >= 40 % and >= 50 %), reranked lifts against drops and the mean rank (more lifts, lower mean), and
/match's true pair against a same-subcategory negative over the first 16 items (>= 12 of 16),
with the training's wall-clock minutes (CPU class in the header).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fashionbert.catalog.demo import generate
from fashionbert.catalog.readers import open_catalog
from fashionbert.runtime.exported import ExportedModel
from fashionbert.index.search import Searcher
from fashionbert.index.build import build
from fashionbert.index.store import CatalogIndex
from fashionbert.model.export import ExportConfig, export
from fashionbert.model.config import TrainConfig
from fashionbert.model.train import train

ROOT = Path(__file__).resolve().parent.parent


def ci_train_config() -> dict:
    spec = importlib.util.spec_from_file_location("ci_conftest", ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.TINY_TRAIN)


def quality(model_dir: Path, index_dir: Path, items) -> dict:
    model = ExportedModel(model_dir)
    index = CatalogIndex(index_dir, model_hash=model.model_hash)
    searcher = Searcher(model, index)
    ranks = {False: [], True: []}
    for it in [it for it in items if it.split == "validation"]:
        for rerank in (False, True):
            ids = [r.id for r in searcher.search_text(it.caption, k=20, rerank=rerank, rerank_k=20).results]
            ranks[rerank].append(ids.index(it.id) + 1 if it.id in ids else 21)
    recall, reranked = np.array(ranks[False]), np.array(ranks[True])
    wins = 0
    for it in items[:16]:
        other = next(o for o in items if o.subcategory == it.subcategory and o.product_id != it.product_id)
        text = model.encode_text([it.caption])
        true_states = index.patches.read([index.rows_of([it.id])[it.id]])
        _, other_states = model.encode_images(other.image[None])
        wins += bool(model.rerank_logits(text, 0, true_states)[0] > model.rerank_logits(text, 0, other_states)[0])
    return {"captions": len(recall), "top10_recall": float(np.mean(recall <= 10)), "top10_reranked": float(np.mean(reranked <= 10)),
            "up": int((reranked < recall).sum()), "down": int((reranked > recall).sum()),
            "mean_rank_recall": float(recall.mean()), "mean_rank_reranked": float(reranked.mean()), "match_wins": wins}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--set", action="append", default=[], help="KEY=JSON_VALUE over the CI training config")
    parser.add_argument("--work", help="a directory to keep the runs in (default: a temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    work = Path(args.work or tempfile.mkdtemp(prefix="ci-model-"))
    catalog = work / "catalog"
    if not (catalog / "catalog.jsonl").is_file():
        generate(catalog, n=150, seed=3, validation_share=0.36)
    items = list(open_catalog(catalog).items())
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; "
          f"{time.strftime('%Y-%m-%d')}; overrides: {overrides or 'none'}\n")
    print("| seed | train min | stage steps | top 10 recall / reranked | up / down | mean rank recall -> reranked "
          "| /match wins of 16 | passes |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = TrainConfig.from_dict({**ci_train_config(), **overrides, "seed": seed})
        run = work / f"run-{seed}"
        started = time.perf_counter()
        summary = train(catalog, run, cfg, features_path=work / "grid.h5", overwrite=True, progress=False)
        minutes = (time.perf_counter() - started) / 60
        export(run, work / f"model-{seed}", ExportConfig(catalog=str(catalog), select_queries=10), overwrite=True,
               progress=False)
        build(ExportedModel(work / f"model-{seed}"), open_catalog(catalog), work / f"index-{seed}", overwrite=True,
              progress=False)
        q = quality(work / f"model-{seed}", work / f"index-{seed}", items)
        ok = (q["top10_recall"] >= 0.4 and q["top10_reranked"] >= 0.5 and q["up"] > q["down"]
              and q["mean_rank_reranked"] < q["mean_rank_recall"] and q["match_wins"] >= 12)
        print(f"| {seed} | {minutes:.1f} | {(summary['rerank_stage'] or {}).get('steps', 0)} | "
              f"{q['top10_recall']:.0%} / {q['top10_reranked']:.0%} | {q['up']} / {q['down']} | "
              f"{q['mean_rank_recall']:.2f} -> {q['mean_rank_reranked']:.2f} | {q['match_wins']} | {'yes' if ok else 'NO'} |",
              flush=True)


if __name__ == "__main__":
    main()
