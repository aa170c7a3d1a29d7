"""The demo catalog: varied, deterministic, fine-grained, and the same in both formats."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest

from fashionbert.catalog.demo import generate, metadata_of
from fashionbert.catalog.demo_render import render
from fashionbert.catalog.demo_spec import COLOURS, PATTERNS_GARMENT, SUBCATEGORIES, make_spec
from fashionbert.catalog.readers import open_catalog


def test_catalog_is_varied_enough_for_fine_grained_matching():
    assert len(SUBCATEGORIES) >= 10
    assert len({s.category for s in SUBCATEGORIES}) >= 5
    assert len(COLOURS) >= 12
    assert set(PATTERNS_GARMENT) >= {"solid", "horizontal stripes", "vertical stripes", "polka dots", "check", "colour-block"}
    for sub in SUBCATEGORIES:
        varying = 1 + (len(sub.patterns) > 1) + sum(len(v) > 1 for v in sub.details.values())  # 1: colour
        assert varying >= 3, sub.key
    specs = [make_spec(0, i) for i in range(3000)]
    assert {s.sub.key for s in specs} == {s.key for s in SUBCATEGORIES}
    assert {s.colour for s in specs} == set(COLOURS)
    # Products of one subcategory really do differ: at least 3 attribute dimensions take several values.
    for sub in SUBCATEGORIES:
        seen: dict[str, set] = {}
        for s in specs:
            if s.sub is sub:
                for k, v in s.attributes().items():
                    seen.setdefault(k, set()).add(v)
        assert sum(len(v) > 1 for v in seen.values()) >= 3, sub.key


def _phrases(sub, dim, value):
    return [p.removeprefix("a ").removeprefix("an ").lower() for p in sub.details[dim][value][1]]


@pytest.mark.parametrize("index", range(400))
def test_caption_states_every_visible_attribute(index):
    spec = make_spec(7, index)
    text = spec.description.lower()
    assert spec.colour in text and spec.colour in spec.name.lower()
    if spec.pattern_colour:
        assert spec.pattern_colour in text and spec.pattern_colour in spec.name.lower()
    pattern_words = {"horizontal stripes": ("horizontal", "stripe"), "vertical stripes": ("vertical", "stripe"),
                     "polka dots": ("polka",), "check": ("check",), "colour-block": ("colour-block",),
                     "side stripe": ("side", "stripe"), "solid": ()}
    assert all(w in text for w in pattern_words[spec.pattern])
    for dim, value in spec.details.items():
        assert any(p in text for p in _phrases(spec.sub, dim, value)), (dim, value, spec.description)
        # ... and no phrase of another value of the same dimension, which would contradict it
        for other in spec.sub.details[dim]:
            if other != value:
                assert not any(re.search(rf"\b{re.escape(p)}\b", text) for p in _phrases(spec.sub, dim, other)
                               if not any(p in q for q in _phrases(spec.sub, dim, value))), (dim, other, spec.description)
    assert 1 <= len(re.findall(r"[.!?](\s|$)", spec.description)) <= 12


def test_every_detail_changes_the_pixels():
    """Swapping one attribute value of a product changes its image: the model can see every attribute."""
    for sub in SUBCATEGORIES:
        spec = next(s for s in (make_spec(1, i) for i in range(500)) if s.sub is sub and s.pattern == "solid")
        base = render(spec).astype(int)
        for dim, values in sub.details.items():
            for value in values:
                if value == spec.details[dim]:
                    continue
                changed = render(type(spec)(**{**spec.__dict__, "details": {**spec.details, dim: value}})).astype(int)
                differing = (np.abs(changed - base).sum(axis=2) > 30).sum()
                assert differing > 40, (sub.key, dim, value, differing)


def test_named_colour_is_the_colour_in_the_image():
    for i in range(200):
        spec = make_spec(2, i)
        if spec.pattern != "solid" or spec.sub.key in ("sneakers", "boots", "tote"):
            continue
        image = render(spec).reshape(-1, 3).astype(float)
        colours = np.array(list(COLOURS.values()), dtype=float)
        nearest = np.argmin(((image[:, None, :] - colours[None]) ** 2).sum(-1), axis=1)
        counts = np.bincount(nearest, minlength=len(colours))
        background = list(COLOURS).index("white")
        counts[background] = 0  # the backdrop is near-white
        if spec.colour == "white":
            continue
        assert list(COLOURS)[int(counts.argmax())] == spec.colour, spec.name


def test_generator_is_deterministic_and_images_are_unique(tmp_path):
    a = generate(tmp_path / "a", n=30, seed=11).out
    b = generate(tmp_path / "b", n=30, seed=11).out
    c = generate(tmp_path / "c", n=30, seed=12).out
    assert (a / "catalog.jsonl").read_text() == (b / "catalog.jsonl").read_text()
    for row in map(json.loads, (a / "catalog.jsonl").read_text().splitlines()):
        assert (a / row["image"]).read_bytes() == (b / row["image"]).read_bytes()
    assert (a / "catalog.jsonl").read_text() != (c / "catalog.jsonl").read_text()
    images = [item.image for item in open_catalog(a).items()]
    assert all(im.shape == (256, 256, 3) and im.dtype == np.uint8 for im in images)
    assert len({im.tobytes() for im in images}) == len(images)


def test_parallel_workers_write_the_same_catalog(tmp_path):
    one = generate(tmp_path / "one", n=20, seed=5, workers=1).out
    two = generate(tmp_path / "two", n=20, seed=5, workers=2).out
    assert (one / "catalog.jsonl").read_text() == (two / "catalog.jsonl").read_text()
    assert (one / "images/100019.png").read_bytes() == (two / "images/100019.png").read_bytes()


def test_split_is_by_product_with_the_asked_share(tmp_path):
    out = generate(tmp_path / "s", n=50, seed=1, validation_share=0.2).out
    catalog = open_catalog(out)
    assert len(catalog.records("validation")) == 10 and len(catalog.records("train")) == 40
    assert not {r.product_id for r in catalog.records("train")} & {r.product_id for r in catalog.records("validation")}


def test_refuses_to_overwrite_without_asking(tmp_path):
    out = generate(tmp_path / "x", n=3, seed=1).out
    before = (out / "catalog.jsonl").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate(out, n=5, seed=2)
    assert (out / "catalog.jsonl").read_text() == before
    generate(out, n=5, seed=2, overwrite=True)
    assert len((out / "catalog.jsonl").read_text().splitlines()) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_fashiongen_format_has_the_public_layout(tmp_path):
    out = generate(tmp_path / "fg", n=25, seed=4, fmt="fashiongen").out
    assert sorted(p.name for p in out.iterdir()) == ["fashiongen_256_256_train.h5", "fashiongen_256_256_validation.h5"]
    with h5py.File(out / "fashiongen_256_256_train.h5") as f:
        n = f["input_image"].shape[0]
        assert f["input_image"].shape == (n, 256, 256, 3) and f["input_image"].dtype == np.uint8
        for key in ("input_name", "input_description", "input_category", "input_subcategory", "input_concat_description",
                    "input_gender", "input_brand", "input_composition", "input_department", "input_season"):
            assert f[key].shape == (n, 1) and f[key].dtype.kind == "S", key
        assert f["input_productID"].shape == (n, 1) and f["input_productID"].dtype == np.int32
        assert f["input_msrpUSD"].dtype == np.float32 and f["index"].dtype == np.int64


def test_both_formats_read_as_identical_products(tmp_path):
    jsonl = open_catalog(generate(tmp_path / "j", n=40, seed=9).out)
    fg = open_catalog(generate(tmp_path / "f", n=40, seed=9, fmt="fashiongen").out)
    for split in ("train", "validation"):
        a = sorted(jsonl.items(split), key=lambda it: it.id)
        b = sorted(fg.items(split), key=lambda it: it.id)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x == y  # every field, metadata included
            assert np.array_equal(x.image, y.image)
    spec = make_spec(9, 0)
    item = next(it for it in jsonl.records() if it.id == str(spec.product_id))
    assert item.metadata == metadata_of(spec)
