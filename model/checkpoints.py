"""A training run's directory: the checkpoint a resume starts from, the best model, the loss-weight plot.

    RUN/checkpoint/   weights, optimiser, counters, loss weights, torch RNG (trainer.pt): for resuming
    RUN/model/        the best weights so far: safetensors + config.json (+ "train", "validation") + tokenizer
    RUN/log.jsonl     losses and weights every step (appended by the loop)
    RUN/loss_weights.png

Both directories are replaced in one step (fashionbert/atomic.py): a crash at any moment leaves
the previous checkpoint, and a model/ that is whole.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..atomic import staged_dir, staged_file
from .config import ADDED_OPTIONS, RERANK_STAGE_OPTIONS, TrainConfig, without_removed
from .fashionbert import FashionBert, load_model, save_model

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    elapsed: float = 0.0
    best_score: float = -1.0
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    stopped: str = ""


def has_checkpoint(run: Path) -> bool:
    return (run / "checkpoint" / "trainer.pt").is_file()


def read_checkpoint(run: Path, cfg: TrainConfig) -> dict:
    """RUN/checkpoint's trainer state, with "loop_done" added; a ValueError when it was trained with
    other settings than `cfg`.

    Options added since the run started count with the value it trained with (ADDED_OPTIONS),
    others with today's defaults: a run from before a default changed (cross_texts 12 -> 4 with the
    rerank stage; weights_every, frozen_layers and masked_texts on 2026-12-03) resumes only with its
    own settings in --config, and the error names them. Once the loop is done, the rerank stage's
    options may change. Options that no longer exist (rerank_minutes, before the budget was in
    work; the removed experiments at their "off" value) do not count.
    """
    ckpt = torch.load(run / "checkpoint" / "trainer.pt", map_location="cpu", weights_only=False)
    ckpt["loop_done"] = bool(ckpt["state"].get("stopped")) or ckpt["state"]["epoch"] >= ckpt["config"].get("epochs", cfg.epochs)
    ignore = set(RERANK_STAGE_OPTIONS) if ckpt["loop_done"] else set()
    known = {f.name for f in fields(TrainConfig)}
    try:
        old = without_removed(ckpt["config"])
    except ValueError:  # it trained with an experiment since removed
        old = None
    saved = None if old is None else {k: v for k, v in {**asdict(TrainConfig()), **ADDED_OPTIONS, **old}.items()
                                      if k not in ignore and k in known}
    wanted = {k: v for k, v in asdict(cfg).items() if k not in ignore}
    if saved != wanted:
        differ = "" if saved is None else ", ".join(f"{k} {saved.get(k)!r} (asked: {v!r})" for k, v in wanted.items()
                                                     if saved.get(k) != v)
        raise ValueError(f"{run} holds a run with other settings{': ' + differ if differ else ''}; pass them in "
                         "--config to resume it, or --overwrite to start again")
    return ckpt


def restore_checkpoint(run: Path, ckpt: dict, model: FashionBert, optimizer, weighting) -> TrainState:
    """Load the checkpoint's weights, optimiser, loss weights and torch RNG; returns its counters."""
    resumed_model, _ = load_model(run / "checkpoint")
    model.load_state_dict(resumed_model.state_dict())
    optimizer.load_state_dict(ckpt["optimizer"])
    weighting.weights = ckpt["weights"]
    torch.set_rng_state(ckpt["torch_rng"])
    return TrainState(**ckpt["state"])


def save_checkpoint(run: Path, model: FashionBert, optimizer, state: TrainState, weighting, cfg: TrainConfig) -> None:
    with staged_dir(run / "checkpoint") as tmp:  # the commit point: a crash before it keeps the previous checkpoint
        save_model(model, tmp)
        torch.save({"optimizer": optimizer.state_dict(), "state": asdict(state), "weights": weighting.weights,
                    "config": asdict(cfg), "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")


def save_best(run: Path, model: FashionBert, cfg: TrainConfig, bert_dir: Path, metrics: dict,
              extra: dict | None = None) -> None:
    # One step (no moment without model/): a resume after a crash here still finds the best model and
    # so still runs the rerank stage on it.
    with staged_dir(run / "model") as tmp:
        save_model(model, tmp, extra={"train": asdict(cfg), "validation": metrics, **(extra or {})})
        for name in TOKENIZER_FILES:
            if (bert_dir / name).is_file():
                shutil.copy(bert_dir / name, tmp / name)


def plot_weights(log_path: Path, out: Path) -> None:
    """Task weights over training, like the paper's Figure 4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, (ax_w, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    for task in rows[-1]["weights"]:
        steps = [r["step"] for r in rows if task in r["weights"]]
        ax_w.plot(steps, [r["weights"][task] for r in rows if task in r["weights"]], label=task.upper())
        ax_l.plot(steps, [r["losses"][task] for r in rows if task in r["losses"]], label=task.upper())
    ax_w.set(title="Adaptive loss weights", xlabel="step", ylabel="weight")
    ax_l.set(title="Task losses", xlabel="step", ylabel="loss", yscale="log")
    for ax in (ax_w, ax_l):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with staged_file(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
