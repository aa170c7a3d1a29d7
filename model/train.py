"""`fashionbert train`: multitask FashionBERT training (MLM, MPM, TIA, ITC) with the adaptive loss,
then the rerank stage.

Per epoch: the batches (model/batches.py; neighbourhoods of the current model's caption
embeddings from the second epoch), one step each: the task losses (model/losses.py) weighted by
the adaptive rule (model/adaptive_loss.py) and summed; then the quick validation check
(model/evaluate.py), the best model kept, a checkpoint (model/checkpoints.py). After the loop,
the best model's cross-encoder trains alone (model/rerank_stage.py), and with
`calibration_products` the rerank weight is fitted on the held-out products (model/calibrate.py).
Options: model/config.py.

The run directory holds `model/` (the best weights so far: safetensors + config.json + tokenizer),
`checkpoint/` (weights, optimiser and counters, for resuming), `log.jsonl` (losses and weights
every step), `loss_weights.png` and `summary.json`.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import write_text
from ..catalog.readers import open_catalog
from .adaptive_loss import AdaptiveLossWeights
from .batches import caption_embeddings, epoch_batches
from .calibrate import calibrate_rerank, calibration_products
from .checkpoints import (TrainState, has_checkpoint, plot_weights, read_checkpoint, restore_checkpoint, save_best,
                          save_checkpoint)
from .config import TrainConfig, new_model
from .data import ensure_features, load_split
from .evaluate import quick_validation
from .fashionbert import load_model
from .features import resolve_precision
from .losses import step_losses
from .optim import lr_factor, param_groups
from .rerank_stage import train_rerank_stage
from ..runtime.feature_store import FeatureStore, default_features_path
from ..runtime.tokenizer import CaptionTokenizer

log = logging.getLogger(__name__)
CUT = "cut by the wall-clock cap"  # how `stopped` begins when --max-minutes ended the loop


def train(catalog_path: str | Path, run: str | Path, cfg: TrainConfig, features_path: str | Path | None = None,
          overwrite: bool = False, progress: bool = True) -> dict:
    cfg.validate()
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if cfg.deterministic and cfg.device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for reproducible sums
    # warn_only: an op without a deterministic kernel (some on CUDA) warns instead of stopping the run.
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    try:
        return _train(catalog_path, run, cfg, features_path, overwrite, progress)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _train(catalog_path: str | Path, run: str | Path, cfg: TrainConfig, features_path: str | Path | None,
           overwrite: bool, progress: bool) -> dict:
    run = Path(run)
    if overwrite and run.exists():
        shutil.rmtree(run)
    resume = has_checkpoint(run)
    if run.exists() and any(run.iterdir()) and not resume:
        raise FileExistsError(f"{run} exists without a checkpoint to resume: pass --overwrite or choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    precision = resolve_precision(cfg.precision, device)

    catalog = open_catalog(catalog_path)
    features_path = Path(features_path) if features_path else default_features_path(catalog_path, cfg.feature_mode)
    ensure_features(catalog, features_path, cfg.feature_mode, progress=progress)
    store = FeatureStore(features_path)

    # Seeded after the features: computing them builds the CNN, which draws from torch's RNG, and a
    # run whose features were not yet cached would start from other random weights.
    torch.manual_seed(cfg.seed)
    model, bert_dir = new_model(cfg, num_patches=store.shape[1], patch_dim=store.shape[2])
    # The run's own count (the default depends on the backbone's depth): saved, compared on resume.
    cfg = replace(cfg, frozen_layers=cfg.frozen_for(model.config.unimodal_layers), patch_pool=cfg.pool)
    tok = CaptionTokenizer(bert_dir / "tokenizer.json", cfg.max_text_len)
    subcats: dict[str, int] = {}
    held = calibration_products(catalog, cfg)
    train_data = load_split(catalog, "train", store, tok, subcats, limit=cfg.max_train_products, seed=cfg.seed,
                            products=lambda p: p not in held)
    val_data = load_split(catalog, "validation", store, tok, subcats, limit=cfg.val_products, seed=cfg.seed)
    calib_data = load_split(catalog, "train", store, tok, subcats, products=held.__contains__) if held else None
    store.close()

    groups = param_groups(model, cfg)
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    weighting = AdaptiveLossWeights(list(cfg.tasks), cfg.loss_weighting)
    state = TrainState()
    if resume:
        ckpt = read_checkpoint(run, cfg)
        if ckpt["loop_done"] and (run / "summary.json").is_file():
            log.info("%s is already trained; pass --overwrite to train again.", run)
            return json.loads((run / "summary.json").read_text())
        state = restore_checkpoint(run, ckpt, model, optimizer, weighting)
        log.info("Resuming %s at epoch %d, step %d (%.1f minutes of training done).", run, state.epoch + 1, state.step,
                 state.elapsed / 60)
    if cfg.frozen_layers and state.epoch < cfg.epochs and not state.stopped:
        # Without dropout: the frozen layers' states of a caption are the same at every step.
        train_data.text_cache = model.eval().lower_text_states(train_data.ids, train_data.mask, cfg.frozen_layers)
        log.info("The embeddings and the first %d layers stay frozen: the training captions' states below them "
                 "were computed once (%.0f MB).", cfg.frozen_layers, train_data.text_cache.nbytes / 2**20)
    model.to(device).train()
    shared = model.last_shared_weight()  # where the adaptive rule reads gradient norms
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")  # noqa: E731
    batches_per_epoch = len(epoch_batches(train_data, cfg, 0))
    total_steps = cfg.epochs * batches_per_epoch
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    log.info("Training on %d products (%d validation, subset of %d for per-epoch checks): %d steps per epoch, "
             "%d epochs (%d steps)%s, %s, tasks %s, %s loss weights.", len(train_data),
             len(catalog.records("validation")), len(val_data), batches_per_epoch, cfg.epochs, total_steps,
             f", cut at {cfg.max_minutes:g} minutes if not done by then" if budget else "",
             precision, "+".join(cfg.tasks), cfg.loss_weighting)

    log_file = open(run / "log.jsonl", "a")
    last_ckpt = time.perf_counter()
    started = time.perf_counter() - state.elapsed
    try:
        while state.epoch < cfg.epochs and not state.stopped:
            if budget and time.perf_counter() - started > budget:  # before this epoch's embedding
                state.stopped = f"{CUT} of {budget / 60:g} minutes"
                break
            text_emb = None
            if cfg.neighbour_batches and state.epoch > 0:
                model.eval()
                with autocast():
                    text_emb = caption_embeddings(model, train_data, frozen=cfg.frozen_layers)
                model.train()
            batches = epoch_batches(train_data, cfg, state.epoch, text_emb)
            bar = tqdm(total=len(batches), initial=state.step_in_epoch, desc=f"Epoch {state.epoch + 1}",
                       disable=not progress, unit="step", mininterval=1.0)
            for rows in batches[state.step_in_epoch :]:
                state.elapsed = time.perf_counter() - started
                if budget and state.elapsed > budget:
                    state.stopped = f"{CUT} of {budget / 60:g} minutes"
                    break
                rng = np.random.default_rng([cfg.seed, state.step, 3])
                factor = lr_factor(state.step, total_steps, cfg.warmup, state.elapsed, budget)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                with autocast():
                    losses = step_losses(model, train_data, rows, cfg, tok, rng)
                weights = weighting.current(losses) if state.step % cfg.weights_every else None
                weights = weights or weighting.update(losses, shared)
                loss = weighting.combine(losses, weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                optimizer.step()
                state.step += 1
                state.step_in_epoch += 1
                record = {"step": state.step, "epoch": state.epoch + 1, "elapsed": round(state.elapsed, 1),
                          "lr_factor": round(factor, 4), "losses": {k: round(float(v.detach()), 4) for k, v in losses.items()},
                          "weights": {k: round(w, 4) for k, w in weights.items()}}
                log_file.write(json.dumps(record) + "\n")
                if state.step % 10 == 0:
                    log_file.flush()
                bar.set_postfix_str(" ".join(f"{k}={record['losses'][k]:.3f}/w{weights[k]:.2f}" for k in losses))
                bar.update(1)
                if time.perf_counter() - last_ckpt > cfg.checkpoint_minutes * 60:
                    log_file.flush()
                    save_checkpoint(run, model, optimizer, state, weighting, cfg)
                    last_ckpt = time.perf_counter()
            bar.close()
            epoch_done = state.step_in_epoch >= len(batches)
            metrics = quick_validation(model, val_data, cfg, autocast)
            state.elapsed = time.perf_counter() - started
            state.history.append({"epoch": state.epoch + 1, "step": state.step, "complete": epoch_done,
                                  "minutes": round(state.elapsed / 60, 2), **metrics})
            log.info("Epoch %d%s: validation two-tower R@1 %.3f, reranked R@1 %.3f (%.1f min).", state.epoch + 1,
                     "" if epoch_done else " (partial)", metrics["two_tower_r1"], metrics["rerank_r1"], state.elapsed / 60)
            if metrics["score"] > state.best_score:
                state.best_score, state.bad_epochs = metrics["score"], 0
                save_best(run, model, cfg, bert_dir, metrics)
            else:
                state.bad_epochs += 1
                if state.bad_epochs >= cfg.patience:
                    state.stopped = f"no better validation score for {cfg.patience} epochs"
            if epoch_done:
                state.epoch += 1
                state.step_in_epoch = 0
            log_file.flush()
            save_checkpoint(run, model, optimizer, state, weighting, cfg)
            last_ckpt = time.perf_counter()
        state.stopped = state.stopped or f"{cfg.epochs} epochs done"
    except KeyboardInterrupt:
        log_file.flush()
        save_checkpoint(run, model, optimizer, state, weighting, cfg)
        log.warning("Interrupted: checkpoint saved; run the same command again to resume.")
        raise
    finally:
        log_file.close()
        train_data.text_cache = None  # the loop's alone: the rerank stage encodes its own states

    stage = None
    if cfg.rerank_stage and (run / "model").is_dir():
        best, meta = load_model(run / "model")
        stage = meta.get("rerank_stage")  # already done when a crash came after it
        if stage is None:
            best.to(device)
            stage = train_rerank_stage(best, train_data, cfg, autocast, progress)
            stage["validation_before"] = meta["validation"]
            stage["validation_after"] = quick_validation(best, val_data, cfg, autocast)
            best.eval()
            log.info("After the rerank stage: validation reranked R@1 %.3f (before: %.3f; two-tower %.3f).",
                     stage["validation_after"]["rerank_r1"], meta["validation"]["rerank_r1"],
                     stage["validation_after"]["two_tower_r1"])
            # "validation" describes the weights saved beside it: the stage's.
            save_best(run, best, cfg, bert_dir, stage["validation_after"], extra={"rerank_stage": stage})

    # None: not fitted here (`fashionbert calibrate` may fit it later, into model/config.json).
    rerank = None
    if calib_data is not None and (run / "model").is_dir():
        rerank = calibrate_rerank(run, *load_model(run / "model"), calib_data, cfg.rerank_k, device, autocast)
    loop_cut = state.stopped.startswith(CUT)
    cut = loop_cut or bool(stage and stage.get("cut"))
    if loop_cut:
        log.warning("Training was cut by its %g-minute cap (--max-minutes) after %d of the about %d steps of its %d "
                    "epochs (%.0f%%): the learning rate was fitted into that time, so this model saw less training "
                    "than the recipe plans and is weaker than it; without --max-minutes the run does all its epochs "
                    "on any machine.", cfg.max_minutes, state.step, total_steps, cfg.epochs, 100 * state.step / total_steps)
    summary = {"stopped": state.stopped, "cut": cut, "steps": state.step, "planned_steps": total_steps,
               "epochs": len(state.history),
               "training_minutes": round(state.elapsed / 60 + (stage["minutes"] if stage else 0), 2),
               "rerank_stage": stage,
               "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "best_validation": max(state.history, key=lambda h: h["score"]) if state.history else None,
               "history": state.history, "rerank": rerank, "precision": precision, "config": asdict(cfg),
               "features": str(features_path), "catalog": str(catalog_path)}
    write_text(run / "summary.json", json.dumps(summary, indent=2))
    plot_weights(run / "log.jsonl", run / "loss_weights.png")
    log.info("Training stopped (%s) after %d steps, %.1f minutes; best model in %s.", state.stopped, state.step,
             state.elapsed / 60, run / "model")
    return summary
