"""Collect the evaluation results of several runs into one markdown table for the README.

    .venv/bin/python bench/ablation_table.py data/runs/default data/runs/global ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fused(g: dict) -> str:
    return f" (fused {g['fused_t2i']['R@1']:.1f})" if "fused_t2i" in g else ""


def main() -> None:
    print("| run | features | patch tokens | layers | tasks | loss weights | steps | train min | T2I R@1/5/10 | I2T R@1/5/10 "
          "| match acc / AUC | gallery R@1: two-tower → reranked (fused) | rerank weight | stage steps |")
    print("| --- | --- | ---: | ---: | --- | --- | ---: | ---: | --- | --- | --- | --- | ---: | ---: |")
    for run in map(Path, sys.argv[1:]):
        summary = json.loads((run / "summary.json").read_text())
        result = json.loads((run / "eval" / "validation.json").read_text())
        cfg, p, m, g = summary["config"], result["paper_protocol"], result["matching"], result["full_gallery"]
        weight = (json.loads((run / "model" / "config.json").read_text()).get("rerank") or {}).get("cross_weight")
        stage = (summary.get("rerank_stage") or {}).get("steps", 0)
        r = lambda d: "/".join(f"{p[d][k]['mean']:.1f}" for k in ("R@1", "R@5", "R@10"))  # noqa: E731
        tokens = 1 if cfg["feature_mode"] == "global" else 64 // (cfg.get("patch_pool") or 1) ** 2  # runs before it kept 64
        print(f"| {run.name} | {cfg['feature_mode']} | {tokens} | {cfg['layers'] or 6} | {'+'.join(cfg['tasks'])} | "
              f"{cfg['loss_weighting']} | {summary['steps']} | {summary['training_minutes']:.1f} | {r('t2i')} | {r('i2t')} | "
              f"{m['accuracy']:.1f} / {m['auc']:.3f} | {g['two_tower_t2i']['R@1']:.1f} → {g['reranked_t2i']['R@1']:.1f}"
              f"{fused(g)} | {'—' if weight is None else f'{weight:g}'} | {stage} |")


if __name__ == "__main__":
    main()
