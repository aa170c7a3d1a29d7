"""The optimiser's parameter groups and the learning-rate schedule (the multitask loop and the rerank stage)."""

from __future__ import annotations

from .config import TrainConfig
from .fashionbert import FashionBert


def param_groups(model: FashionBert, cfg: TrainConfig) -> list[dict]:
    """AdamW's groups: the pre-trained trunk (its fusion-layer copies included), the new layers and
    heads, and the temperature (no weight decay). `base_lr` is what the schedule scales. (A faster
    rate for the fusion layers, 5e-4, was measured worse: docs/results-history.md.)"""
    backbone = {id(p) for p in model.backbone_parameters()}
    scale = model.itc.logit_scale
    groups = [
        {"params": [p for p in model.parameters() if id(p) in backbone], "lr": cfg.lr_backbone},
        {"params": [p for p in model.parameters() if id(p) not in backbone and p is not scale], "lr": cfg.lr_new},
        {"params": [scale], "lr": cfg.lr_new, "weight_decay": 0.0},
    ]
    return [{**g, "base_lr": g["lr"]} for g in groups]


def lr_factor(step: int, total: int, warmup: float, elapsed: float = 0.0, budget: float | None = None) -> float:
    """Linear warm-up then linear decay over `total` steps; under a wall-clock `budget` (seconds), over
    whichever ends first, so a run the cap cuts still ends its schedule at zero."""
    progress = step / total if total else 1.0
    if budget:
        progress = max(progress, elapsed / budget)
    if progress < warmup:
        return max(progress / warmup, 0.01)
    return max(0.0, (1 - progress) / (1 - warmup))
