"""One recipe's runs over several seeds as a markdown table, with the mean and the spread.

Each run needs `fashionbert eval ... --gallery-queries 1200 --queries 5 --draws 1 --name gallery-all`
(the full gallery) and `fashionbert eval ... --queries 100 --draws 3 --name paper` (the paper
protocol) beside its summary.json:

    .venv/bin/python bench/seed_table.py data/runs/lean-s0 data/runs/lean-s1 data/runs/lean-s2
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

COLUMNS = ("two-tower R@1", "served R@1", "cross-encoder alone R@1", "I2T two-tower R@1", "paper T2I R@1",
           "paper I2T R@1", "match acc", "rerank weight", "training min")


def row(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    g = json.loads((run / "eval" / "gallery-all.json").read_text())
    paper = run / "eval" / "paper.json"
    p = json.loads(paper.read_text())["paper_protocol"] if paper.is_file() else None
    fg = g["full_gallery"]
    return {"seed": summary["config"]["seed"], "precision": summary["precision"],
            "two-tower R@1": fg["two_tower_t2i"]["R@1"], "served R@1": fg["fused_t2i"]["R@1"],
            "cross-encoder alone R@1": fg["reranked_t2i"]["R@1"], "I2T two-tower R@1": fg["two_tower_i2t"]["R@1"],
            "paper T2I R@1": p["t2i"]["R@1"]["mean"] if p else None, "paper I2T R@1": p["i2t"]["R@1"]["mean"] if p else None,
            "match acc": g["matching"]["accuracy"], "rerank weight": fg["cross_weight"],
            "training min": summary["training_minutes"]}


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    rows = [row(Path(r)) for r in sys.argv[1:]]
    print("| seed | precision | " + " | ".join(COLUMNS) + " |")
    print("| ---: | --- | " + " | ".join("---:" for _ in COLUMNS) + " |")
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        print(f"| {r['seed']} | {r['precision']} | " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |")
    if len(rows) > 1:
        cells = []
        for c in COLUMNS:
            vals = [r[c] for r in rows if r[c] is not None]
            cells.append(f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} ({min(vals):.2f}–{max(vals):.2f})"
                         if len(vals) > 1 else "—")
        print("| mean ± sd (min–max) | | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
