"""Patch features: shapes per mode, the content-hash cache, resume after interruption, atomic writes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fashionbert.catalog.images import to_model_image
from fashionbert.catalog.readers import open_catalog
from fashionbert.model.feature_cache import compute_features
from fashionbert.runtime.feature_store import FeatureCacheError, FeatureStore
from fashionbert.model.features import FeatureConfig, PatchFeatureExtractor, feature_engine


@pytest.fixture(scope="module")
def grid_extractor():
    return PatchFeatureExtractor(FeatureConfig("grid"))


@pytest.fixture
def catalog_dir(demo_catalog, tmp_path):
    """A private 12-product copy of the demo catalog, free to change."""
    root = tmp_path / "cat"
    shutil.copytree(demo_catalog, root)
    lines = (root / "catalog.jsonl").read_text().splitlines()[:12]
    (root / "catalog.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_modes_give_the_documented_shapes(demo_catalog):
    images = np.stack([to_model_image(it.image) for it, _ in zip(open_catalog(demo_catalog).items(), range(2))])
    grid = PatchFeatureExtractor(FeatureConfig("grid")).extract(images)
    glob = PatchFeatureExtractor(FeatureConfig("global")).extract(images)
    crop = PatchFeatureExtractor(FeatureConfig("crop", crop_size=64)).extract(images)
    assert grid.shape == crop.shape == (2, 64, 1286) and glob.shape == (2, 1, 1286)
    assert grid.dtype == np.float16
    # global is the mean of the grid cells: the same map, pooled (colour means pool the same way)
    np.testing.assert_allclose(grid[..., :1280].astype(np.float32).mean(1), glob[:, 0, :1280].astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(grid[..., 1280:1283].astype(np.float32).mean(1), glob[:, 0, 1280:1283].astype(np.float32), atol=2e-3)
    np.testing.assert_array_equal(grid[..., 1280:], crop[..., 1280:])  # same patches, same colours
    # patches see different things: the background corner differs from the garment centre
    assert np.abs(grid[0, 0].astype(float) - grid[0, 27].astype(float)).mean() > 0.05
    assert not np.allclose(grid, crop, atol=0.05)


def test_onnx_runtime_computes_the_same_features_and_is_the_cpu_default(demo_catalog, grid_extractor, tmp_path):
    from fashionbert.model.features import OnnxPatchFeatureExtractor

    images = np.stack([to_model_image(it.image) for it, _ in zip(open_catalog(demo_catalog).items(), range(4))])
    ref = grid_extractor.extract(images).astype(np.float32)
    got = OnnxPatchFeatureExtractor(FeatureConfig("grid")).extract(images)
    assert got.shape == ref.shape and got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), ref, atol=2e-2, rtol=1e-2)  # float16 storage of both
    assert np.abs(got.astype(np.float32) - ref).mean() < 1e-3
    with pytest.raises(ValueError, match="fp32"):
        OnnxPatchFeatureExtractor(FeatureConfig("grid")).extract(images, precision="bf16")
    glob = OnnxPatchFeatureExtractor(FeatureConfig("global")).extract(images[:2]).astype(np.float32)
    want = PatchFeatureExtractor(FeatureConfig("global")).extract(images[:2]).astype(np.float32)
    assert glob.shape == (2, 1, 1286) and np.abs(glob - want).mean() < 1e-3
    assert feature_engine("auto", torch.device("cpu")) == feature_engine("fp32", torch.device("cpu")) == ("onnxruntime", "fp32")
    assert feature_engine("bf16", torch.device("cpu")) == ("torch", "bf16")
    # With no extractor given, a CPU computes fp32 features with ONNX Runtime on every machine class.
    catalog = open_catalog(demo_catalog)
    compute_features(catalog, tmp_path / "f.h5", split="validation", progress=False)
    with FeatureStore(tmp_path / "f.h5") as store:
        assert store.attrs["precision"] == "fp32"
        first = [it for it in catalog.items("validation")][:4]
        want = grid_extractor.extract(np.stack([to_model_image(it.image) for it in first])).astype(np.float32)
        assert np.abs(store.get([it.id for it in first]).astype(np.float32) - want).mean() < 1e-3


def test_a_cache_made_under_another_default_keeps_its_precision(catalog_dir, grid_extractor, tmp_path):
    """A cache the old default made in bf16 (PyTorch, on bf16 CPUs) is reused under `auto`, not refused."""
    import h5py

    out = tmp_path / "f.h5"
    compute_features(open_catalog(catalog_dir), out, grid_extractor, precision="fp32", progress=False)
    with h5py.File(out, "r+") as f:
        f.attrs["precision"] = "bf16"  # as the old default wrote it on an AVX-512 bf16 machine
    again = compute_features(open_catalog(catalog_dir), out, progress=False)
    assert again.computed == 0 and again.reused == again.total
    with FeatureStore(out) as store:
        assert store.attrs["precision"] == "bf16"
    with pytest.raises(FeatureCacheError, match="precision: bf16 here, fp32 asked"):
        compute_features(open_catalog(catalog_dir), out, precision="fp32", progress=False)


def test_colour_statistics_name_the_patch_colour(grid_extractor):
    image = np.zeros((1, 256, 256, 3), np.uint8)
    image[0, :, :128] = (200, 30, 40)  # left half red
    image[0, :, 128:] = (30, 40, 90)  # right half navy
    image[0, :32, :32:4] = 255  # a striped top-left patch
    colour = grid_extractor.extract(image)[0, :, 1280:].astype(np.float32)
    np.testing.assert_allclose(colour[9, :3], (np.array([200, 30, 40]) - 127) / 128, atol=1e-2)
    np.testing.assert_allclose(colour[14, :3], (np.array([30, 40, 90]) - 127) / 128, atol=1e-2)
    assert colour[9, 3:].max() < 1e-3 and colour[0, 4:].min() > 0.5  # plain vs striped (white on red: G, B vary)


def test_pretrained_weights_are_loaded_not_random(grid_extractor):
    """An untrained net would give the same (near-constant) response to a stripe and a plain patch."""
    plain = np.full((1, 256, 256, 3), 200, np.uint8)
    striped = plain.copy()
    striped[0, ::8] = 20
    a, b = grid_extractor.extract(plain), grid_extractor.extract(striped)
    assert np.abs(a.astype(float) - b.astype(float)).mean() > 0.1
    conv = grid_extractor.net._conv_stem.weight
    assert conv.abs().mean() > 0.05 and conv.std() > 0.1


def test_cache_hits_misses_and_drops(catalog_dir, grid_extractor, tmp_path):
    out = tmp_path / "feats.h5"
    catalog = open_catalog(catalog_dir)
    first = compute_features(catalog, out, grid_extractor, precision="fp32", progress=False)
    assert (first.computed, first.reused, first.total) == (12, 0, 12)
    with FeatureStore(out) as store:
        ids = store.ids
        before = store.get(ids)
        assert store.shape == (12, 64, 1286) and before.dtype == np.float16
        assert store.attrs["mode"] == "grid" and store.attrs["precision"] == "fp32"
    # The stored features are the CNN's output for that item's image.
    item = next(it for it in catalog.items() if it.id == ids[3])
    np.testing.assert_allclose(before[3].astype(np.float32),
                               grid_extractor.extract(to_model_image(item.image)[None])[0].astype(np.float32), atol=1e-2)

    again = compute_features(open_catalog(catalog_dir), out, grid_extractor, precision="fp32", progress=False)
    assert (again.computed, again.reused) == (0, 12)

    # Change one image, remove one product: exactly that one is recomputed, the other dropped.
    changed = catalog_dir / f"images/{ids[5]}.png"
    img = np.asarray(Image.open(changed)).copy()
    img[100:140, 100:140] = (255, 0, 0)
    Image.fromarray(img).save(changed)
    lines = (catalog_dir / "catalog.jsonl").read_text().splitlines()
    (catalog_dir / "catalog.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    third = compute_features(open_catalog(catalog_dir), out, grid_extractor, precision="fp32", progress=False)
    assert (third.computed, third.reused, third.dropped, third.total) == (1, 10, 1, 11)
    with FeatureStore(out) as store:
        after = store.get(ids[:11])
    assert not np.allclose(after[5], before[5], atol=1e-2)
    np.testing.assert_array_equal(np.delete(after, 5, 0), np.delete(before[:11], 5, 0))


def test_split_selection_keeps_the_other_split(catalog_dir, grid_extractor, tmp_path):
    out = tmp_path / "f.h5"
    catalog = open_catalog(catalog_dir)
    n_train = len(catalog.records("train"))
    compute_features(catalog, out, grid_extractor, precision="fp32", split="train", progress=False)
    run = compute_features(catalog, out, grid_extractor, precision="fp32", split="validation", progress=False)
    assert run.total == 12 and run.computed == 12 - n_train


class Interrupting:
    """The real extractor, with a power cut after a number of batches."""

    def __init__(self, inner, batches):
        self.inner, self.left = inner, batches

    def extract(self, *args, **kwargs):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return self.inner.extract(*args, **kwargs)


def test_interrupted_run_resumes_and_keeps_the_last_good_file(catalog_dir, grid_extractor, tmp_path):
    out = tmp_path / "f.h5"
    catalog = open_catalog(catalog_dir)
    compute_features(catalog, out, grid_extractor, precision="fp32", progress=False)
    with FeatureStore(out) as store:
        good = store.get(store.ids)
    # Every image changes (a new catalog version); the update is cut off after 2 of 3 batches.
    for p in (catalog_dir / "images").glob("*.png"):
        img = np.asarray(Image.open(p)).copy()
        img[:16] = 0
        Image.fromarray(img).save(p)
    catalog = open_catalog(catalog_dir)
    with pytest.raises(KeyboardInterrupt):
        compute_features(catalog, out, Interrupting(grid_extractor, 2), precision="fp32", batch_size=4, part_size=4,
                         progress=False)
    with FeatureStore(out) as store:  # the old file is intact and readable
        np.testing.assert_array_equal(store.get(store.ids), good)
    resumed = compute_features(catalog, out, grid_extractor, precision="fp32", batch_size=4, part_size=4, progress=False)
    assert (resumed.resumed, resumed.computed) == (8, 4)
    assert not (tmp_path / "f.h5.parts").exists()
    fresh = compute_features(catalog, tmp_path / "fresh.h5", grid_extractor, precision="fp32", progress=False)
    with FeatureStore(out) as a, FeatureStore(fresh.path) as b:
        np.testing.assert_allclose(a.get(a.ids).astype(np.float32), b.get(a.ids).astype(np.float32), atol=1e-2)


def test_other_settings_are_not_mixed_in(catalog_dir, tmp_path):
    out = tmp_path / "f.h5"
    catalog = open_catalog(catalog_dir)
    glob = PatchFeatureExtractor(FeatureConfig("global"))
    compute_features(catalog, out, glob, mode="global", precision="fp32", progress=False)
    with pytest.raises(FeatureCacheError, match="mode: global here, grid asked"):
        compute_features(catalog, out, mode="grid", precision="fp32", progress=False)
    with FeatureStore(out) as store:
        assert store.shape == (12, 1, 1286)
        with pytest.raises(FeatureCacheError, match="no features for item 'nope'"):
            store.get(["nope"])
    with pytest.raises(FeatureCacheError, match="no feature file here"):
        FeatureStore(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(FeatureCacheError, match="not a feature file"):
        FeatureStore(tmp_path / "junk.h5")


def test_auto_precision_is_fp32_when_torch_kernels_are_held_to_avx2():
    # The slow class's emulation on a fast CPU: its flags say bf16, its kernels cannot use it.
    import os
    import subprocess
    import sys

    code = "import torch; from fashionbert.model.features import resolve_precision; print(resolve_precision('auto', torch.device('cpu')))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "fp32", out.stderr
