"""FashionBERT: shapes and masks, the tasks learn, weights round-trip, the adaptive rule, the protocol."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from fashionbert.catalog.readers import open_catalog
from fashionbert.model.adaptive_loss import AdaptiveLossWeights, closed_form_weights, objective
from fashionbert.model.config import TrainConfig
from fashionbert.model.data import load_split, negatives_by_subcategory
from fashionbert.model.evaluate import EvalConfig, auc, full_gallery, matching
from fashionbert.model.fashionbert import (FashionBert, FashionBertConfig, default_backbone, from_pretrained_bert,
                                           load_model, mean_pool, pack, save_model)
from fashionbert.model.feature_cache import compute_features
from fashionbert.runtime.feature_store import FeatureStore
from fashionbert.model.features import FeatureConfig, PatchFeatureExtractor
from fashionbert.model.losses import step_losses
from fashionbert.model.masking import mask_patches, whole_word_mask
from fashionbert.model.optim import lr_factor, param_groups
from fashionbert.model.protocol import paper_protocol, rank_of_positive, recall_at
from fashionbert.runtime.tokenizer import CaptionTokenizer

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, dropout=0.0)


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer(default_backbone() / "tokenizer.json", 64)


@pytest.fixture(scope="module")
def demo_data(demo_catalog, tmp_path_factory, tok):
    """The demo catalog's train split (96 products) with real grid features."""
    path = tmp_path_factory.mktemp("feats") / "grid.h5"
    catalog = open_catalog(demo_catalog)
    compute_features(catalog, path, PatchFeatureExtractor(FeatureConfig("grid")), precision="fp32", progress=False)
    with FeatureStore(path) as store:
        return load_split(catalog, "train", store, tok, {})


def tiny_model(seed=0, **kw) -> FashionBert:
    torch.manual_seed(seed)
    return FashionBert(FashionBertConfig(**{**TINY, **kw})).eval()


def test_pack_puts_patches_right_after_each_text():
    text = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1) + 100
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    patches = -torch.arange(1, 4, dtype=torch.float).view(1, 3, 1).expand(2, 3, 1)
    seq, seq_mask, first = pack(text, mask, patches)
    assert seq[0, :, 0].tolist()[:7] == [100, 101, 102, 103, -1, -2, -3]
    assert seq[1, :5, 0].tolist() == [104, 105, -1, -2, -3]  # no padding between text and patches
    assert seq_mask.tolist() == [[True] * 7, [True] * 5 + [False] * 2]
    assert first.tolist() == [4, 2]


def test_shapes_and_padding_is_invisible(tok):
    model = tiny_model()
    enc = tok(["navy striped long sleeve shirt with a spread collar", "red boots"])
    ids, mask = torch.from_numpy(enc.ids), torch.from_numpy(enc.mask)
    feats = torch.rand(2, 64, 1286)
    hidden, seq_mask, first = model.fuse(model.text_states(ids, mask), mask, model.image_states(feats))
    assert hidden.shape == (2, ids.shape[1] + 64, 32) and seq_mask.shape == hidden.shape[:2]
    assert model.text_embedding(ids, mask).shape == (2, 256) and model.image_embedding(feats).shape == (2, 256)
    assert torch.allclose(model.image_embedding(feats).norm(dim=-1), torch.ones(2))
    with torch.no_grad():
        batched = model.match_logits(ids, mask, feats)[1]
        alone_enc = tok(["red boots"])
        alone = model.match_logits(torch.from_numpy(alone_enc.ids), torch.from_numpy(alone_enc.mask), feats[1:])[0]
        assert torch.allclose(batched, alone, atol=1e-5)  # padding changes nothing
        junk = ids.clone()
        junk[mask == 0] = 999  # whatever sits in the padding is never read
        assert torch.allclose(model.match_logits(junk, mask, feats), model.match_logits(ids, mask, feats), atol=1e-6)
        one = model.text_embedding(torch.from_numpy(alone_enc.ids), torch.from_numpy(alone_enc.mask))
        assert torch.allclose(model.text_embedding(ids, mask)[1], one[0], atol=1e-5)
    glob = tiny_model(num_patches=1)  # the object-level ablation: one global feature
    assert glob.match_logits(ids, mask, torch.rand(2, 1, 1286)).shape == (2,)


def test_pooled_patches_are_the_grids_block_means_and_every_pass_takes_the_grid(demo_data, tok):
    """patch_pool 2: 16 tokens, each the mean of a 2x2 block of the row-major 8x8 grid; the model's
    passes take the cached grid as it is, and a batch pooled beforehand gives the same results."""
    model = tiny_model(num_patches=16, patch_pool=2)
    assert model.config.feature_patches == 64
    grid = torch.arange(64, dtype=torch.float).view(1, 64, 1).expand(1, 64, 3)
    pooled = model.patch_embeddings.pool(grid)
    assert pooled.shape == (1, 16, 3)
    assert pooled[0, 0, 0] == (0 + 1 + 8 + 9) / 4 and pooled[0, 5, 0] == (18 + 19 + 26 + 27) / 4
    feats = demo_data.feats[:4].float()
    with torch.no_grad():
        states = model.image_states(feats)
        assert states.shape == (4, 16, 32)
        torch.testing.assert_close(model.image_states(model.patch_embeddings.pool(feats)), states)
        ids, mask = demo_data.texts(np.arange(4))
        assert model.match_logits(ids, mask, feats).shape == (4,)
    with pytest.raises(ValueError, match="cannot be pooled"):
        model.image_states(torch.rand(2, 49, 1286))
    losses = step_losses(model.train(), demo_data, np.arange(16), TrainConfig(patch_pool=2, batch_size=16, cross_texts=4,
                         tia_negatives=3), tok, np.random.default_rng(0))
    assert set(losses) == {"mlm", "mpm", "tia", "itc"} and all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="patch_pool"):
        TrainConfig(patch_pool=3).validate()
    with pytest.raises(ValueError, match="patch_pool"):
        TrainConfig(patch_pool=2, feature_mode="global").validate()


def test_late_fusion_reuses_unimodal_states(demo_data):
    """Below the fusion layers nothing crosses modalities; the scorer's cached states give the same scores."""
    from fashionbert.model.pair_scorer import PairScorer

    model = tiny_model(num_layers=3, fusion_layers=1)
    assert model.config.unimodal_layers == 2
    ids, mask = demo_data.texts(np.arange(4))
    feats = demo_data.feats[:4].float()
    with torch.no_grad():
        hidden, _, first = model.fuse(model.text_states(ids, mask), mask, model.image_states(feats))
        other, _, _ = model.fuse(model.text_states(ids, mask), mask, model.image_states(feats.flip(0)))
        assert not torch.allclose(hidden[:, 0], other[:, 0])  # the fusion layer lets [CLS] see the image
        direct = torch.sigmoid(model.match_logits(ids, mask, feats)).numpy()
    scorer = PairScorer(model, demo_data)
    np.testing.assert_allclose(scorer(np.arange(4), np.arange(4)), direct, atol=1e-5)
    np.testing.assert_allclose(scorer.similarity()[:4, :4],
                               (model.text_embedding(ids, mask) @ model.image_embedding(feats).T).detach().numpy(), atol=1e-5)
    full = tiny_model(num_layers=2, fusion_layers=2)  # the paper's model: every layer attends across
    assert full.config.unimodal_layers == 0 and full.match_logits(ids, mask, feats).shape == (4,)


def test_captions_batched_by_length_give_each_row_what_it_gets_alone(demo_data):
    """Length batches only cut padding: embeddings and logits are a caption's own (to float
    rounding: a batch of one takes other kernels), in the split's order, whatever the order of the pairs."""
    from fashionbert.model.batches import caption_embeddings
    from fashionbert.model.pair_scorer import PairScorer

    model = tiny_model(num_layers=3, fusion_layers=1)
    lengths = demo_data.mask.sum(1).numpy()
    batches = demo_data.by_length(16)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(demo_data)))
    assert all(lengths[a].max() <= lengths[b].min() for a, b in zip(batches, batches[1:]))
    assert len(set(lengths.tolist())) > 1  # the check means something only with captions of several lengths

    rows = np.array([0, 1, int(np.argmax(lengths)), int(np.argmin(lengths))])
    with torch.inference_mode():
        alone = torch.cat([model.text_embedding(*demo_data.texts([r])) for r in rows]).numpy()
        np.testing.assert_allclose(caption_embeddings(model, demo_data, batch=16)[rows], alone, rtol=0, atol=1e-6)
        # Started from the cached states after a frozen layer (as training does): the same embeddings.
        cached = replace(demo_data, text_cache=model.lower_text_states(demo_data.ids, demo_data.mask, 1))
        np.testing.assert_allclose(caption_embeddings(model, cached, batch=16, frozen=1)[rows], alone, rtol=0, atol=1e-5)
        scorer = PairScorer(model, demo_data, batch=16)
        np.testing.assert_allclose(scorer.text_emb[rows].numpy(), alone, rtol=0, atol=1e-6)
        texts, images = np.repeat(rows, 3), np.tile([2, 5, 7], len(rows))
        one_by_one = np.array([scorer.logits([t], [i])[0] for t, i in zip(texts, images)])
        shuffled = np.random.default_rng(0).permutation(len(texts))
        np.testing.assert_allclose(scorer.logits(texts, images), one_by_one, rtol=0, atol=1e-5)
        np.testing.assert_allclose(scorer.logits(texts[shuffled], images[shuffled]), one_by_one[shuffled], rtol=0, atol=1e-5)
        np.testing.assert_allclose(scorer.logits(texts[shuffled], images[shuffled], batch=4), one_by_one[shuffled],
                                   rtol=0, atol=1e-5)  # several batches, each put back in its pairs' places
        assert scorer.logits([], []).shape == (0,)
        ids, mask = demo_data.texts(rows)
        direct = model.match_logits(ids, mask, demo_data.feats[[2, 2, 2, 2]].float())
    np.testing.assert_allclose(scorer.logits(rows, [2, 2, 2, 2]), direct.numpy(), rtol=0, atol=1e-5)


def test_pretrained_backbone_loads_and_keeps_its_sentence_sense(tok):
    model, _ = from_pretrained_bert(None, dropout=0.0)
    model.eval()
    enc = tok(["navy striped long sleeve shirt", "a dark blue shirt with stripes and long sleeves", "red leather boots with a high heel"])
    with torch.no_grad():
        ids, mask = torch.from_numpy(enc.ids), torch.from_numpy(enc.mask).bool()
        h = torch.nn.functional.normalize(mean_pool(model.encoder(model.embeddings(ids), mask), mask), dim=-1)
    sim = h @ h.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # paraphrases are close only if the weights really loaded
    assert model.mlm.word_embeddings.weight is model.embeddings.word_embeddings.weight  # tied


def test_a_few_steps_lower_every_task_loss(demo_data, tok):
    model = tiny_model().train()
    cfg = TrainConfig(batch_size=16, cross_texts=4, tia_negatives=3, subcategories_per_batch=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rows = np.arange(16)
    first = last = None
    for step in range(25):
        losses = step_losses(model, demo_data, rows, cfg, tok, np.random.default_rng(step % 2))
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values = {k: float(v.detach()) for k, v in losses.items()}
        first = first or values
        last = values
    assert set(first) == {"mlm", "mpm", "tia", "itc"}
    for task in first:
        assert last[task] < first[task], (task, first[task], last[task])


def test_removed_experiments_load_only_switched_off():
    """Options measured worse were removed (docs/experiments.md): a config naming one at its "off" value
    (a summary's config, an old checkpoint's) still loads; one that turns it on is refused."""
    cfg = TrainConfig.from_dict({"mined_negatives": 0, "mining_pool": 16, "tia_detached": False, "epochs": 2})
    assert cfg == TrainConfig(epochs=2)
    for on in ({"mined_negatives": 2}, {"tia_detached": True}):
        with pytest.raises(ValueError, match="removed"):
            TrainConfig.from_dict(on)


def test_hard_negatives_are_the_batchs_nearest_other_products():
    from fashionbert.model.batches import pick_negatives

    product = np.array([0, 0, 1, 2, 3, 4, 5, 6])  # rows 0 and 1 are two poses of one product
    subcategory = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    sim = torch.tensor([[9.0, 8.5, 1.0, 3.0, 2.0, 7.0, 0.0, 0.5]]).repeat(8, 1)
    out = pick_negatives(sim, product, subcategory, 1, 4, np.random.default_rng(0), hard=3)
    assert out[0, :3].tolist() == [5, 3, 4]  # the three nearest by similarity, never a pose of the text's own product
    assert out[0, 3] == 2  # then the same subcategory's remaining product
    one = pick_negatives(sim, product, subcategory, 1, 2, np.random.default_rng(0), hard=1)
    assert one[0, 0] == 5 and product[one[0, 1]] not in (0, 4)


def test_separate_fusion_layers_leave_the_towers_alone(demo_data, tok, tmp_path):
    """With its own fusion layers the cross-encoder can change without moving the two-tower embeddings."""
    model = tiny_model(num_layers=3, fusion_layers=1)
    ids, mask = demo_data.texts(np.arange(4))
    feats = demo_data.feats[:4].float()
    with torch.no_grad():
        before_logits, before_t = model.match_logits(ids, mask, feats), model.text_embedding(ids, mask)
        model.separate_fusion_layers()  # a copy: the same function until training moves it
        assert torch.allclose(model.match_logits(ids, mask, feats), before_logits, atol=1e-6)
        for p in model.fusion.parameters():
            p.add_(0.05 * torch.randn_like(p))
        assert not torch.allclose(model.match_logits(ids, mask, feats), before_logits, atol=1e-3)
        assert torch.equal(model.text_embedding(ids, mask), before_t)
    assert model.last_shared_weight() is model.encoder.layer[1].output.dense.weight  # below the split
    assert {id(p) for p in model.fusion.parameters()} <= {id(p) for p in model.backbone_parameters()}
    save_model(model, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded.match_logits(ids, mask, feats), model.match_logits(ids, mask, feats))
    model.train()
    model.zero_grad(set_to_none=True)
    cfg = TrainConfig(batch_size=16, cross_texts=4, tia_negatives=3, hard_negatives=2, subcategories_per_batch=2,
                      fused_listwise=True, masked_texts=2, separate_fusion=True)
    losses = step_losses(model, demo_data, np.arange(16), cfg, tok, np.random.default_rng(0))
    losses["tia"].backward()
    assert model.fusion.layer[0].output.dense.weight.grad is not None
    # The towers' own top layer never sees TIA; the shared lower layers do.
    assert model.encoder.layer[2].output.dense.weight.grad is None
    assert model.encoder.layer[0].output.dense.weight.grad is not None


def test_optimiser_groups_cover_every_weight_once():
    model = tiny_model(num_layers=3, fusion_layers=1)
    model.separate_fusion_layers()
    groups = param_groups(model, TrainConfig(lr_backbone=1e-4, lr_new=1e-3))
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each once (the tied decoder too), none left out
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert {rate[id(p)] for p in model.fusion.parameters()} == {rate[id(model.encoder.layer[0].output.dense.weight)]} == {1e-4}
    assert rate[id(model.tia.classifier.weight)] == rate[id(model.patch_embeddings.projection.weight)] == 1e-3
    assert [g.get("weight_decay") for g in groups] == [None, None, 0.0] and groups[2]["params"] == [model.itc.logit_scale]
    assert all(g["base_lr"] == g["lr"] for g in groups)


def test_the_default_budget_is_work_not_wall_clock_time():
    cfg = TrainConfig()
    assert cfg.max_minutes is None and cfg.rerank_max_minutes is None  # no cap: the same model on any machine
    assert cfg.epochs >= 1 and cfg.rerank_steps > 300
    for bad in ({"max_minutes": 0}, {"rerank_max_minutes": -1}, {"rerank_steps": -1}, {"epochs": 0}):
        with pytest.raises(ValueError):
            TrainConfig(**bad).validate()
    TrainConfig(max_minutes=30, rerank_max_minutes=5).validate()  # a cap is an explicit option


def test_frozen_lower_layers_keep_their_weights_and_the_cached_states_give_the_same_losses(demo_data, tok):
    from fashionbert.model.config import freeze_lower_layers

    cfg = TrainConfig(batch_size=16, cross_texts=4, tia_negatives=3, subcategories_per_batch=2, frozen_layers=1)
    model = tiny_model(num_layers=3, fusion_layers=1)
    model.separate_fusion_layers()
    freeze_lower_layers(model, 1)
    frozen = list(model.embeddings.parameters()) + list(model.encoder.layer[0].parameters())
    assert not any(p.requires_grad for p in frozen) and model.patch_embeddings.projection.weight.requires_grad
    rows = np.arange(16)
    plain = step_losses(model, demo_data, rows, cfg, tok, np.random.default_rng(0))
    cached = demo_data.subset(np.arange(len(demo_data)))
    cached.text_cache = model.lower_text_states(cached.ids, cached.mask, 1)
    fast = step_losses(model, cached, rows, cfg, tok, np.random.default_rng(0))
    for task in plain:
        assert float(fast[task].detach()) == pytest.approx(float(plain[task].detach()), abs=1e-5), task
    before = [p.detach().clone() for p in frozen]
    optimizer = torch.optim.AdamW(param_groups(model, cfg), weight_decay=0.01)
    sum(fast.values()).backward()
    optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, frozen))  # weight decay too leaves them alone
    assert model.encoder.layer[1].output.dense.weight.grad is not None  # the first layer above trains
    with pytest.raises(ValueError, match="frozen_layers"):  # the adaptive rule reads the last layer below fusion
        freeze_lower_layers(model, 2)
    with pytest.raises(ValueError, match="frozen_layers"):
        TrainConfig(frozen_layers=-1).validate()


def test_the_default_freezes_the_lower_half_of_the_towers_own_layers():
    from fashionbert.model.config import new_model

    cfg = TrainConfig()
    assert [cfg.frozen_for(n) for n in (4, 3, 1, 0)] == [2, 1, 0, 0]
    assert TrainConfig(frozen_layers=0).frozen_for(4) == 0  # an explicit count wins
    # The whole MiniLM (4 layers below the 2 fusion layers), and the paper's 2-layer model (none below).
    for layers, frozen in ((None, 2), (2, 0)):
        c = TrainConfig(layers=layers)
        c.validate()
        model, _ = new_model(c, num_patches=4, patch_dim=8)
        trains = [any(p.requires_grad for p in layer.parameters()) for layer in model.encoder.layer]
        assert trains == [False] * frozen + [True] * (len(trains) - frozen)


def test_a_checkpoint_from_before_the_options_existed_resumes_with_its_own_settings(tmp_path):
    from dataclasses import asdict

    from fashionbert.model.checkpoints import read_checkpoint

    old = TrainConfig(weights_every=1, frozen_layers=0, masked_texts=8, patch_pool=1)
    saved = {k: v for k, v in asdict(old).items() if k not in ("weights_every", "frozen_layers", "patch_pool")}  # not yet named
    (tmp_path / "checkpoint").mkdir()
    torch.save({"config": saved, "state": {"epoch": 1, "stopped": None}}, tmp_path / "checkpoint" / "trainer.pt")
    assert read_checkpoint(tmp_path, old)["loop_done"] is False  # what it trained with: resumes
    with pytest.raises(ValueError) as err:  # today's defaults are another recipe, and the error says which part
        read_checkpoint(tmp_path, TrainConfig(frozen_layers=2))
    assert "weights_every 1 (asked: 4)" in str(err.value) and "frozen_layers 0 (asked: 2)" in str(err.value)
    assert "masked_texts 8 (asked: 4)" in str(err.value) and "epochs" not in str(err.value)
    assert "patch_pool 1 (asked: None)" in str(err.value)


def test_the_adaptive_weights_can_be_solved_every_few_steps():
    weighting = AdaptiveLossWeights(["itc", "tia"])
    w = torch.nn.Parameter(torch.ones(3))
    losses = {"itc": (w * torch.tensor([3.0, 0.0, 0.0])).sum(), "tia": (w * torch.tensor([0.0, 1.0, 0.0])).sum()}
    solved = weighting.update(losses, w)
    assert solved["itc"] > solved["tia"]
    assert weighting.current(losses) == solved  # kept between solves
    assert weighting.current({"itc": losses["itc"]}) is None  # other tasks: solve again
    with pytest.raises(ValueError, match="weights_every"):
        TrainConfig(weights_every=0).validate()


def test_the_learning_rate_schedule_ends_at_zero_with_or_without_a_cap():
    # By steps: warm-up over the first 6 %, then a linear decay that reaches zero at the last step.
    assert lr_factor(0, 100, 0.06) == 0.01 and lr_factor(3, 100, 0.06) == pytest.approx(0.5)
    assert lr_factor(53, 100, 0.06) == pytest.approx(0.5) and lr_factor(100, 100, 0.06) == 0.0
    # Under a cap, the schedule follows whichever ends first: a run the cap cuts at step 20 of 100 has
    # decayed as a 20-step run would, not stayed at its peak rate.
    assert lr_factor(10, 100, 0.06, elapsed=53, budget=100) == pytest.approx(0.5)
    assert lr_factor(20, 100, 0.06, elapsed=100, budget=100) == 0.0
    assert lr_factor(53, 100, 0.06, elapsed=1, budget=100) == pytest.approx(0.5)  # steps first: as without a cap


def test_dropout_is_a_validated_training_option():
    assert TrainConfig().dropout == 0.0  # off by default (docs/design.md, "Training")
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout"):
            TrainConfig(dropout=bad).validate()
    model = tiny_model(dropout=0.5).train()
    x = torch.randn(2, 5, 32)
    mask = torch.zeros(2, 1, 1, 5)  # additive: every key attended
    attention = model.encoder.layer[0].attention.self
    assert not torch.equal(attention(x, mask)[0], attention(x, mask)[0])  # training: random masks on the weights
    attention.eval()
    assert torch.equal(attention(x, mask)[0], attention(x, mask)[0])


def test_rerank_candidates_are_each_captions_nearest_other_products():
    from fashionbert.model.rerank_stage import rerank_candidates

    product = np.array([0, 0, 1, 2, 3])  # rows 0 and 1: two poses of one product
    text = torch.tensor([[0.9, 0.8, 0.1, 0.7, 0.3]] * 5)
    images = torch.eye(5)  # caption i's similarity to image j is text[i, j]
    top = rerank_candidates(text, images, product, 3, block=2)  # blocks of 2 captions: the same answer
    assert top[0].tolist() == [3, 4, 2]  # by similarity, never a pose of the caption's own product
    assert top[3].tolist() == [0, 1, 4]
    assert (top == rerank_candidates(text, images, product, 3)).all()
    assert rerank_candidates(text, images, product, 10).shape == (5, 3)  # capped by what a caption can have
    assert rerank_candidates(text, images, np.zeros(5, dtype=int), 3).shape == (5, 0)  # one product: none


def _fused_listwise(model, data, lists) -> float:
    """Mean listwise loss of the service's score over fixed lists (true image first)."""
    from fashionbert.model.losses import tia_losses
    from fashionbert.model.pair_scorer import PairScorer

    with torch.no_grad():
        scorer = PairScorer(model, data)
        logits = torch.from_numpy(scorer.logits(np.repeat(np.arange(len(data)), lists.shape[1]), lists.reshape(-1)))
        tower = float(model.itc.scale()) * np.take_along_axis(scorer.similarity(), lists, 1)
        return float(tia_losses(logits.view(lists.shape).float(), torch.from_numpy(tower).float())[0])


def test_rerank_stage_trains_the_cross_encoder_and_leaves_the_towers_alone(demo_data):
    import contextlib

    from fashionbert.model.pair_scorer import PairScorer
    from fashionbert.model.rerank_stage import rerank_candidates, train_rerank_stage

    model = tiny_model(num_layers=3, fusion_layers=1)
    with pytest.raises(ValueError, match="separate_fusion"):  # it would move the towers' layers too
        train_rerank_stage(model, demo_data, TrainConfig(), contextlib.nullcontext, progress=False)
    model.separate_fusion_layers()
    with torch.no_grad():
        before = PairScorer(model, demo_data)
    pool = rerank_candidates(before.text_emb, before.image_emb, demo_data.product, 5)
    lists = np.concatenate([np.arange(len(demo_data))[:, None], pool], 1)
    loss_before = _fused_listwise(model, demo_data, lists)
    cfg = TrainConfig(rerank_epochs=6, rerank_queries=8, rerank_negatives=5, rerank_k=5, lr_backbone=1e-3)
    out = train_rerank_stage(model, demo_data, cfg, contextlib.nullcontext, progress=False)
    assert out["steps"] == out["planned_steps"] == 6 * (len(demo_data) // 8) and not out["cut"]
    assert out["stopped"] == f"{out['steps']} steps done (6 passes over the captions)"  # the passes, not rerank_steps
    with torch.no_grad():
        after = PairScorer(model, demo_data)
    assert torch.equal(after.text_emb, before.text_emb) and torch.equal(after.image_emb, before.image_emb)
    assert all(p.requires_grad for p in model.parameters())  # the towers' weights are trainable again afterwards
    assert _fused_listwise(model, demo_data, lists) < 0.8 * loss_before


def test_a_capped_rerank_stage_is_cut_and_says_so(demo_data, caplog):
    import contextlib

    from fashionbert.model.rerank_stage import train_rerank_stage

    model = tiny_model(num_layers=3, fusion_layers=1)
    model.separate_fusion_layers()
    cfg = TrainConfig(rerank_epochs=6, rerank_queries=8, rerank_negatives=5, rerank_k=5, rerank_max_minutes=1e-6)
    with caplog.at_level("WARNING"):
        out = train_rerank_stage(model, demo_data, cfg, contextlib.nullcontext, progress=False)
    assert out["cut"] and out["steps"] < out["planned_steps"] == 6 * (len(demo_data) // 8)
    assert "cut by the wall-clock cap" in out["stopped"] and "--rerank-max-minutes" in caplog.text


def test_masking_is_whole_words_and_patches(tok):
    enc = tok(["double-breasted cashmere coat in navy with a belt at the waist"])
    ids = torch.from_numpy(enc.ids)
    rng = np.random.default_rng(0)
    for _ in range(20):
        inputs, labels = whole_word_mask(ids, enc.word_ids, 0.3, tok, rng)
        masked_words = {enc.word_ids[0][t] for t in range(ids.shape[1]) if labels[0, t] != -100}
        for t, w in enumerate(enc.word_ids[0]):  # every piece of a chosen word, and nothing else
            assert (labels[0, t] != -100) == (w in masked_words)
        assert labels[0, 0] == -100 and labels[0, -1] == -100  # never [CLS] or [SEP]
    feats = torch.ones(50, 64, 8)
    out, masked = mask_patches(feats, 0.1, rng)
    assert masked.any(1).all() and 0.05 < masked.float().mean() < 0.2
    assert (out[masked] == 0).all() and (out[~masked] == 1).all()


def test_save_and_load_give_identical_outputs(tmp_path, tok):
    model = tiny_model(seed=3)
    save_model(model, tmp_path / "m", extra={"note": "x"})
    loaded, meta = load_model(tmp_path / "m")
    assert meta["note"] == "x" and loaded.config == model.config
    enc = tok(["navy shirt", "white sneakers with a gum sole"])
    ids, mask, feats = torch.from_numpy(enc.ids), torch.from_numpy(enc.mask), torch.rand(2, 64, 1286)
    with torch.no_grad():
        assert torch.equal(model.match_logits(ids, mask, feats), loaded.match_logits(ids, mask, feats))
        assert torch.equal(model.text_embedding(ids, mask), loaded.text_embedding(ids, mask))
    assert loaded.mlm.word_embeddings.weight is loaded.embeddings.word_embeddings.weight
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        (tmp_path / "m" / "model.safetensors").unlink()
        load_model(tmp_path / "m")


def _numerical_minimum(g: np.ndarray, iters=20000, lr=0.01) -> np.ndarray:
    """Projected gradient descent on the simplex, independent of the closed form."""
    def project(v):
        u = np.sort(v)[::-1]
        css = np.cumsum(u)
        k = np.nonzero(u * np.arange(1, len(v) + 1) > css - 1)[0][-1]
        return np.maximum(v - (css[k] - 1) / (k + 1), 0)

    w = np.full(len(g), 1 / len(g))
    for _ in range(iters):
        grad = -w * g + (len(g) * w - w.sum())
        w = project(w - lr * grad)
    return w


@pytest.mark.parametrize("seed", range(6))
def test_adaptive_closed_form_matches_numerical_minimum(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 6))
    norms = rng.random(n) * rng.choice([0.01, 1, 100])
    g = (norms / norms.sum()) ** 2  # the documented normalisation: each g_i in [0, 1]
    closed = closed_form_weights(torch.tensor(g)).numpy()
    numeric = _numerical_minimum(g)
    np.testing.assert_allclose(closed, numeric, atol=1e-4)
    assert objective(torch.tensor(closed), torch.tensor(g)) <= objective(torch.tensor(numeric), torch.tensor(g)) + 1e-9
    assert abs(closed.sum() - 1) < 1e-9 and (closed > 0).all()


def test_adaptive_weights_favour_the_task_with_the_larger_gradient():
    shared = torch.nn.Parameter(torch.ones(3))
    losses = {"a": (shared * 10).sum(), "b": (shared * 0.1).sum(), "c": shared.sum()}
    w = AdaptiveLossWeights(["a", "b", "c"], "adaptive").update(losses, shared)
    assert w["a"] > w["c"] > w["b"] and abs(sum(w.values()) - 1) < 1e-6
    assert AdaptiveLossWeights(["a", "b", "c"], "fixed").update(losses, shared) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    moderate = {"a": shared.sum(), "b": (shared * 0.1).sum(), "c": (shared * 0.5).sum()}  # 3, 0.3, 1.5
    released = AdaptiveLossWeights(["a", "b", "c"], "released-code").update(moderate, shared)
    assert released["a"] > released["c"] > released["b"]
    with pytest.raises(ValueError, match="unknown loss weighting"):
        AdaptiveLossWeights(["a"], "magic")


# The evaluation protocol ---------------------------------------------------------------------------


def test_ranking_metrics_by_hand():
    assert rank_of_positive(np.array([0.9, 0.1, 0.95, 0.5])) == 2
    assert rank_of_positive(np.array([0.5, 0.5, 0.1])) == 2  # a tie ranks against the query
    assert recall_at([1, 3, 7, 12]) == {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0}
    assert auc(np.array([0.9, 0.8]), np.array([0.1, 0.85])) == 0.75
    assert auc(np.array([0.5]), np.array([0.5])) == 0.5


def test_negatives_come_from_the_same_subcategory_first(demo_data):
    rng = np.random.default_rng(0)
    for row in range(len(demo_data)):
        same = int(((demo_data.subcategory == demo_data.subcategory[row]) & (demo_data.product != demo_data.product[row])).sum())
        negs = negatives_by_subcategory(demo_data, row, 6, rng)
        assert len(set(negs.tolist())) == 6 and demo_data.product[row] not in demo_data.product[negs]
        in_sub = demo_data.subcategory[negs] == demo_data.subcategory[row]
        assert in_sub.sum() == min(6, same) and in_sub[: min(6, same)].all()


def test_protocol_against_a_hand_computed_ranking(demo_data):
    """A scorer whose ranking we know: the protocol must report exactly the recall we compute by hand."""
    n = len(demo_data)
    prod = demo_data.product
    # The true pair scores 0.5 + product/1000; negatives score their product/n. So the true pair beats
    # every negative exactly when 0.5 + p/1000 > q/n for all negatives q, which fails for high q only.
    def score(text_rows, image_rows):
        true = prod[text_rows] == prod[image_rows]
        return np.where(true, 0.5 + prod[text_rows] / 1000, prod[image_rows] / n + prod[text_rows] / 10**6)

    cfg = EvalConfig(queries=n, negatives=n - 1, draws=2, gallery_queries=n, recall_n=n, rerank_k=n)
    out = paper_protocol(score, demo_data, cfg, progress=False)
    expected_ranks = [1 + sum(q / n >= 0.5 + p / 1000 for q in range(n) if q != p) for p in range(n)]
    assert out["t2i"]["R@1"]["mean"] == pytest.approx(recall_at(expected_ranks)["R@1"])
    assert out["t2i"]["R@1"]["std"] == 0  # every query is used in every draw: the draws agree
    assert out["candidates"] == n

    m = matching(score, demo_data, cfg)
    assert m["pairs"] == 2 * n and m["accuracy"] > 50
    # Full gallery: a two-tower that ranks every product's image last, and a reranker that fixes it.
    sim = -np.eye(n)
    g = full_gallery(score, sim, demo_data, cfg, progress=False)
    assert g["two_tower_t2i"]["R@1"] == 0.0
    assert g["reranked_t2i"]["R@1"] == pytest.approx(recall_at(expected_ranks)["R@1"])
    # The service's order: weight 0 on the cross-encoder keeps the towers' order; with the towers'
    # logit scaled to nothing, any positive weight gives the cross-encoder's order.
    for weight, scale, fused in ((0.0, 1.0, g["two_tower_t2i"]), (2.0, 0.0, g["reranked_t2i"])):
        out = full_gallery(score, sim, demo_data, cfg, progress=False, itc_scale=scale, cross_weight=weight)
        assert out["fused_t2i"] == fused and out["cross_weight"] == weight


def test_the_rerank_weight_is_fitted_on_held_out_products_and_recorded(demo_data, tmp_path):
    from contextlib import nullcontext

    from fashionbert.runtime.scoring import GRID, cross_weight
    from fashionbert.model.calibrate import calibrate_rerank

    model = tiny_model(num_patches=demo_data.feats.shape[1], patch_dim=demo_data.feats.shape[2])
    save_model(model, tmp_path / "model", extra={"train": {"seed": 0}})
    out = calibrate_rerank(tmp_path, *load_model(tmp_path / "model"), demo_data, 5, torch.device("cpu"), nullcontext)
    _, meta = load_model(tmp_path / "model")
    assert meta["rerank"] == out and meta["train"] == {"seed": 0}  # added beside what was there
    assert cross_weight(meta) in GRID and out["fitted_on"] == len(demo_data) and out["K"] == 5
    assert set(out["mrr_by_weight"]) == {str(w) for w in GRID}
    assert not list((tmp_path / "model").glob("*.tmp"))


def test_neighbour_batches_group_near_duplicates():
    """Given caption embeddings with tight clusters, each group of a batch is one cluster."""
    from fashionbert.model.data import SplitData
    from fashionbert.model.batches import epoch_batches

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    cluster = np.repeat(np.arange(6), 4)  # 24 products, 6 clusters of 4
    emb = centres[cluster] + 0.01 * rng.normal(size=(24, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    data = SplitData(items=[None] * 24, ids=None, mask=None, word_ids=None, feats=None,
                     product=np.arange(24), subcategory=np.zeros(24, dtype=int))
    cfg = TrainConfig(batch_size=8, subcategories_per_batch=2)
    batches = epoch_batches(data, cfg, epoch=1, text_emb=emb)
    assert sorted(np.concatenate(batches).tolist()) == list(range(24))
    for batch in batches:
        for group in (batch[:4], batch[4:]):
            assert len(set(cluster[group])) == 1
    plain = epoch_batches(data, cfg, epoch=1)
    assert any(len(set(cluster[b[:4]])) > 1 for b in plain)  # without embeddings, groups ignore the clusters


def test_a_backbone_that_does_not_load_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    src = default_backbone()
    shutil.copy(src / "config.json", tmp_path / "config.json")
    weights = load_file(str(src / "model.safetensors"))
    save_file({f"other.{k}": v for k, v in weights.items()}, str(tmp_path / "model.safetensors"))  # no BERT names
    with pytest.raises(ValueError, match="lacks or mis-shapes"):
        from_pretrained_bert(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a BERT directory"):
        from_pretrained_bert(tmp_path / "nowhere")
