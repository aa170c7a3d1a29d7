"""`TrainConfig`: every option of `fashionbert train`, one default each (`--config` takes any field as JSON).

The model's own config (model/fashionbert.py FashionBertConfig) gets the fields they share from
here when the model is built (`new_model`): `max_text_len`, `dropout`, `fusion_layers`, `layers`
(its `num_layers`) and `separate_fusion`; the training config's default is the one that counts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from .fashionbert import FashionBert, from_pretrained_bert

TASKS = ("mlm", "mpm", "tia", "itc")
# The rerank stage's options: once the multitask loop of a run is done, a resume may change them.
RERANK_STAGE_OPTIONS = ("rerank_steps", "rerank_epochs", "rerank_max_minutes", "rerank_queries", "rerank_negatives")
# Options measured worse and removed with their code (docs/experiments.md), each with the value
# that meant "off" (None: any value, it did nothing on its own). A --config file or a checkpoint
# that names one at that value still loads; one that turned it on is refused.
REMOVED_OPTIONS = {"mined_negatives": 0, "mining_pool": None, "tia_detached": False}
# Options added since the first runs, each with the value a run from before it trained with: a
# checkpoint that does not name one is compared with that value, not with today's default.
ADDED_OPTIONS = {"weights_every": 1, "frozen_layers": 0, "patch_pool": 1}


@dataclass
class TrainConfig:
    feature_mode: str = "grid"
    # Patch tokens per image: the cached 8x8 grid averaged in patch_pool x patch_pool blocks
    # (model/fashionbert.py FashionBertConfig.patch_pool); 1 keeps all 64. None: 2 (4x4 tokens) for
    # grid and crop features, 1 for one global feature. Every image pass carries a quarter of the
    # tokens: a training step costs 0.41x (AVX-512, bf16) and 0.51x (AVX2 emulated, fp32) of one with 64
    # (docs/training-budget.md), and the rerank reads 16 patch states an item.
    patch_pool: int | None = None
    backbone: str | None = None  # a local Hugging Face BERT directory; None = the MiniLM package
    layers: int | None = None  # keep the first N layers of the backbone (None = all)
    tasks: tuple[str, ...] = TASKS
    loss_weighting: str = "adaptive"
    # Solve the adaptive weights every N steps and keep them in between: each solve costs one
    # partial backward pass per task (15 % of a step on either CPU class, bench/train_step.py), and
    # the weights move slowly (0.24-0.28 over a whole run solving them every step).
    weights_every: int = 4
    # Keep the embeddings and the first N encoder layers at their pre-trained weights. The captions'
    # states after them are then computed once per run instead of every step, and nothing is
    # back-propagated through them for text (at most one fewer than the layers below the fusion
    # layers), nor does dropout apply there. None: the lower half of those layers (2 of the default
    # backbone's 4).
    frozen_layers: int | None = None
    batch_size: int = 48  # products per step: ITC's in-batch negatives
    subcategories_per_batch: int = 4  # groups per batch: subcategories, or neighbourhoods (below)
    # From the second epoch, groups are caption-embedding neighbourhoods: a product's hardest
    # in-batch negatives are near-duplicates, as in a rerank's top K. Full-gallery two-tower R@1 79.5 and 87.1 in two
    # seeds against 70.6-75.2 for four runs with subcategory groups (docs/results-history.md).
    neighbour_batches: bool = True
    # Texts per step through the cross-encoder, each with 1 positive + `tia_negatives`. 4, not 12: a
    # quarter of a step cheaper (bench/train_step.py), and the rerank stage (below) trains the
    # cross-encoder far faster than these pairs do.
    cross_texts: int = 4
    tia_negatives: int = 5  # per text: the batch's hardest by two-tower similarity, then random same-subcategory
    hard_negatives: int = 4  # of those, how many are the batch's hardest by two-tower similarity (at most all)
    # The listwise TIA loss ranks each text's candidates by the score the service ranks by:
    # cross-encoder logit + the two-tower's logit (held fixed). The cross-encoder then learns
    # what the towers get wrong among their own nearest candidates, which is what a rerank is for.
    fused_listwise: bool = True
    # True pairs per step in the MLM/MPM pass. With the two options above, 4 instead of 8 make a step
    # 0.62x (AVX2) and 0.53x (AVX-512) as costly at the same quality (docs/training-budget.md).
    masked_texts: int = 4
    separate_fusion: bool = True  # the cross-encoder's fusion layers are its own (model/fashionbert.py)
    # Dropout in the trunk and the new layers (BERT's is 0.1). Off by default: the random masks
    # cost a quarter of a CPU training step (bench/train_step.py), and a few epochs over the
    # demo catalog do not overfit (a tiny catalog trained for many epochs does: tests/conftest.py).
    dropout: float = 0.0
    lr_backbone: float = 1e-4
    lr_new: float = 1e-3  # patch embeddings and heads start from scratch: a higher rate
    weight_decay: float = 0.01
    warmup: float = 0.06  # share of the run
    clip: float = 1.0
    # The budget is work, not time: the same command and seed do the same training on any machine.
    # 5: with 16 patch tokens a step costs about half of one with 64, and the validation check still
    # rose through a fifth epoch (docs/training-budget.md); 4 was the 64-token recipe's.
    epochs: int = 5
    # An optional cap on the multitask loop's wall-clock minutes (validation included); None = none.
    # A capped run fits its learning-rate schedule into the time it has (it still decays to zero),
    # and is no longer reproducible: where it stops depends on the machine.
    max_minutes: float | None = None
    patience: int = 2  # epochs without a better validation score before stopping
    mlm_prob: float = 0.15
    mpm_prob: float = 0.10
    max_text_len: int = 64
    fusion_layers: int = 2  # the last N layers attend across modalities (num_layers = the paper's full model)
    val_products: int = 400
    # Training products held out of training to fit the rerank's weight on the cross-encoder logit
    # (runtime/scoring.py); at most a tenth of them, and none when that is under 20. Off by
    # default: on the demo catalog a default-budget run holding out 400 of the 4,800 reached 61.4
    # full-gallery two-tower R@1 against 71.8 without (docs/results-history.md); `fashionbert calibrate`
    # fits the weight afterwards on products the run never saw instead. With neither, it is 1.
    calibration_products: int = 0
    rerank_k: int = 20  # the rerank depth the weight is fitted for (the service's default)
    # The rerank stage (model/rerank_stage.py): `rerank_steps` steps train the cross-encoder alone,
    # training captions against their two-tower top `rerank_k`; 0 = no stage. 400: about what the
    # tuned recipe's 3 minutes reached on the machine it was tuned on (378).
    rerank_steps: int = 400
    rerank_epochs: int = 3  # a cap in passes over the training captions (tiny catalogs reach it first)
    rerank_max_minutes: float | None = None  # an optional wall-clock cap on the stage, encoding included
    rerank_queries: int = 6  # captions per step
    rerank_negatives: int = 11  # per caption, drawn from its top `rerank_k` other products
    val_queries: int = 100
    checkpoint_minutes: float = 3.0
    precision: str = "auto"
    device: str = "cpu"
    seed: int = 0
    # PyTorch's deterministic kernels: with the same seed, threads and machine, a rerun trains the
    # same weights (multithreaded CPU kernels otherwise sum in a varying order, and training turns
    # those 1e-4 differences into another model within a few epochs).
    deterministic: bool = True
    max_train_products: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A config from JSON options: unknown ones are refused, removed ones (REMOVED_OPTIONS) dropped."""
        d = without_removed(d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(sorted(unknown))}")
        if "tasks" in d:
            d["tasks"] = tuple(d["tasks"])
        return cls(**d)

    def validate(self) -> None:
        bad = set(self.tasks) - set(TASKS)
        if bad or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {', '.join(TASKS)}")
        if self.feature_mode not in ("grid", "crop", "global"):
            raise ValueError("feature_mode must be grid, crop or global")
        if self.pool not in (1, 2, 4, 8) or (self.feature_mode == "global" and self.pool != 1):
            raise ValueError("patch_pool must be 1, 2, 4 or 8 (1 for global features)")
        if self.layers is not None and self.layers < 1:
            raise ValueError("layers must be at least 1 (or null for all of the backbone's)")
        if self.batch_size < 2 or not 1 <= self.cross_texts <= self.batch_size:
            raise ValueError("need batch_size >= 2 and 1 <= cross_texts <= batch_size")
        if not 1 <= self.tia_negatives < self.batch_size:
            raise ValueError("need 1 <= tia_negatives < batch_size")
        if self.hard_negatives < 1 or self.masked_texts < 1:  # both are capped by the batch (tia_negatives, batch_size)
            raise ValueError("need hard_negatives >= 1 and masked_texts >= 1")
        if self.calibration_products < 0 or self.rerank_k < 2:
            raise ValueError("need calibration_products >= 0 and rerank_k >= 2")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if self.weights_every < 1:
            raise ValueError("weights_every must be at least 1 (1 = solve the loss weights every step)")
        if self.frozen_layers is not None and self.frozen_layers < 0:
            raise ValueError("frozen_layers must be at least 0 (or null for the lower half of the towers' own layers)")
        if self.layers and self.frozen_layers and self.frozen_layers >= self.layers - min(self.fusion_layers, self.layers):
            raise ValueError("frozen_layers must be below the layers under the fusion layers (layers - fusion_layers)")
        if self.epochs < 1:
            raise ValueError("epochs must be at least 1")
        for name in ("max_minutes", "rerank_max_minutes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive (or null for no wall-clock cap)")
        if self.rerank_steps < 0:
            raise ValueError("rerank_steps (--rerank-steps) must be at least 0 (0 = no rerank stage)")
        if min(self.rerank_epochs, self.rerank_queries, self.rerank_negatives) < 1:
            raise ValueError("need rerank_epochs, rerank_queries and rerank_negatives >= 1")

    @property
    def pool(self) -> int:
        """The patch pooling this config trains with (`patch_pool`, or its default for the feature mode)."""
        if self.patch_pool is not None:
            return self.patch_pool
        return 1 if self.feature_mode == "global" else 2

    def frozen_for(self, unimodal_layers: int) -> int:
        """How many layers stay frozen in a model with this many layers below its fusion layers."""
        return unimodal_layers // 2 if self.frozen_layers is None else self.frozen_layers

    @property
    def rerank_stage(self) -> bool:
        """Whether the run ends with the rerank stage (it trains the cross-encoder's own layers)."""
        return self.rerank_steps > 0 and "tia" in self.tasks and self.separate_fusion

    def model_overrides(self) -> dict:
        """The model config's fields this config decides (FashionBertConfig), for `from_pretrained_bert`."""
        out = {"max_text_len": self.max_text_len, "dropout": self.dropout, "fusion_layers": self.fusion_layers,
               "patch_pool": self.pool}
        if self.layers:
            out.update(num_layers=self.layers, fusion_layers=min(self.fusion_layers, self.layers))
        return out


def without_removed(d: dict) -> dict:
    """`d` without the removed options; a ValueError when one of them was turned on."""
    on = sorted(k for k, off in REMOVED_OPTIONS.items() if k in d and off is not None and d[k] != off)
    if on:
        raise ValueError(f"{', '.join(on)}: removed (measured worse; docs/experiments.md)")
    return {k: v for k, v in d.items() if k not in REMOVED_OPTIONS}


def new_model(cfg: TrainConfig, num_patches: int, patch_dim: int) -> tuple[FashionBert, Path]:
    """The model a run starts from: the pre-trained backbone with this config's fields, for patch
    features of num_patches x patch_dim (before the config's pooling); and the backbone's directory
    (its tokenizer files)."""
    if num_patches % cfg.pool**2:
        raise ValueError(f"{num_patches} patch features per image cannot be pooled {cfg.pool}x{cfg.pool}")
    model, bert_dir = from_pretrained_bert(cfg.backbone, num_patches=num_patches // cfg.pool**2, patch_dim=patch_dim,
                                           **cfg.model_overrides())
    # After the trunk is loaded, not as a constructor field: the copy starts from the pre-trained
    # fusion layers (from_pretrained_bert loads the towers' layers only), and building it here
    # keeps the random initialisation of the new layers in the order earlier full-depth runs drew
    # it (a run with `layers` set now builds only those layers, so its heads draw differently).
    if cfg.separate_fusion:
        model.separate_fusion_layers()
    freeze_lower_layers(model, cfg.frozen_for(model.config.unimodal_layers))
    return model, bert_dir


def freeze_lower_layers(model: FashionBert, n: int) -> None:
    """Fix the embeddings and the first n encoder layers (the towers' own, below the fusion layers).
    The patch embeddings' projection, positions and LayerNorm stay trainable, since they start from
    scratch; their segment row is the text's token-type table and stays as pre-trained, and so do
    the word embeddings that the MLM head decodes with."""
    if not n:
        return
    # The adaptive rule reads gradient norms on the last layer below the fusion layers: it must train.
    below = model.config.unimodal_layers
    if n >= below:
        raise ValueError(f"frozen_layers ({n}) must be below the {below} layers under the fusion layers")
    for p in list(model.embeddings.parameters()) + [p for layer in model.encoder.layer[:n] for p in layer.parameters()]:
        p.requires_grad_(False)
