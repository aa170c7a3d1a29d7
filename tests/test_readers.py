"""Catalog readers: the generic JSONL catalog and Fashion-Gen HDF5, good rows and bad ones."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fashionbert.catalog.images import image_hash, to_model_image
from fashionbert.catalog.items import CatalogError
from fashionbert.catalog.readers import open_catalog

from .conftest import FASHIONGEN_SAMPLE, fg_row, product_row, solid_image, write_fashiongen, write_jsonl


# Fashion-Gen ---------------------------------------------------------------------------------

def test_reads_the_independent_fashiongen_sample_as_it_is():
    catalog = open_catalog(FASHIONGEN_SAMPLE.parent)
    items = list(catalog.items("validation"))
    assert len(items) == 12 and len({it.product_id for it in items}) == 8
    poses = {pid: [it.id for it in items if it.product_id == pid] for pid in ("301001", "301003", "301007")}
    assert poses == {"301001": ["301001", "301001-2"], "301003": ["301003", "301003-2", "301003-3"],
                     "301007": ["301007", "301007-2"]}
    first = items[0]
    assert first.name == "Black crêpe trousers"  # latin-1 decoded
    assert first.description == "Straight-leg trousers in black crêpe. Mid-rise. Zip fly."
    assert (first.category, first.subcategory, first.split) == ("PANTS", "TROUSERS", "validation")
    assert first.metadata["brand"] == "Jil Sander" and first.metadata["gender"] == "WOMEN"
    assert first.metadata["price"] == 100.0 and first.metadata["season"] == "FW2017"
    assert "concat_description" not in first.metadata and "index" not in first.metadata
    assert {it.metadata["brand"] for it in items} >= {"Maison Kitsuné"}
    assert first.image.shape == (256, 256, 3) and first.image.dtype == np.uint8
    assert len({it.subcategory for it in items}) == 8
    with pytest.raises(CatalogError, match="fashiongen_256_256_train.h5.*missing"):
        catalog.records("train")


def test_fashiongen_multi_pose_products_and_lazy_chunks(tmp_path, monkeypatch):
    import fashionbert.catalog.readers as readers

    monkeypatch.setattr(readers, "FG_CHUNK", 3)  # several chunks even for a small file
    rows = [fg_row(7, 1), fg_row(7, 2), fg_row(8, 1, colour=(0, 0, 200)), fg_row(7, 3), fg_row(9, 1, price=129.99)]
    write_fashiongen(tmp_path / "fashiongen_256_256_train.h5", rows)
    write_fashiongen(tmp_path / "fashiongen_256_256_validation.h5", [fg_row(11, 1)])
    catalog = open_catalog(tmp_path)
    train = list(catalog.items("train"))
    assert [it.id for it in train] == ["7", "7-2", "8", "7-3", "9"]
    assert [it.product_id for it in train] == ["7", "7", "8", "7", "9"]
    assert train[3].metadata["pose"] == "id_gridfs_3" and train[4].metadata["price"] == 129.99
    assert all(np.array_equal(it.image, r["image"]) for it, r in zip(train, rows))
    assert [it.id for it in catalog.items("validation")] == ["11"]
    assert len(catalog.records()) == 6
    assert train[0].name == "Red crêpe coat 7" and train[0].metadata["brand"] == "Côté"


def test_fashiongen_bad_files_are_named(tmp_path):
    path = write_fashiongen(tmp_path / "a" / "fashiongen_256_256_train.h5", [fg_row(1), fg_row(2, name="", description="")])
    catalog = open_catalog(path.parent)
    with pytest.raises(CatalogError, match=r"fashiongen_256_256_train.h5, row 1: empty caption"):
        list(catalog.items())
    skipping = open_catalog(path.parent, on_error="skip")
    assert [it.id for it in skipping.items()] == ["1"] and skipping.problems.count == 1

    import h5py
    with h5py.File(path, "a") as f:
        del f["input_description"]
    with pytest.raises(CatalogError, match="missing dataset input_description"):
        open_catalog(path.parent)

    both = tmp_path / "b"
    write_fashiongen(both / "fashiongen_256_256_train.h5", [fg_row(5)])
    write_fashiongen(both / "fashiongen_256_256_validation.h5", [fg_row(5)])
    with pytest.raises(CatalogError, match="product 5 is in both"):
        open_catalog(both)

    junk = tmp_path / "c" / "fashiongen_256_256_train.h5"
    junk.parent.mkdir()
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(CatalogError, match="not a readable HDF5 file"):
        open_catalog(junk.parent)


# Generic JSONL -------------------------------------------------------------------------------

def test_jsonl_fields_metadata_and_default_split(tmp_path):
    rows = [product_row(1, split="validation", gender="MEN", brand="Nordvik", price=49, fabric="linen"),
            product_row(2, product_id="shirt-A"), product_row(3, product_id="shirt-A"), product_row(4, id=4)]
    rows[3]["image"] = "images/p4.png"
    catalog = open_catalog(write_jsonl(tmp_path, rows))
    items = {it.id: it for it in catalog.items()}
    assert set(items) == {"p1", "p2", "p3", "4"}
    assert items["p1"].split == "validation"
    assert items["p1"].metadata == {"gender": "MEN", "brand": "Nordvik", "price": 49.0, "fabric": "linen"}
    assert items["p2"].product_id == items["p3"].product_id == "shirt-A"
    assert items["p2"].split == items["p3"].split  # a product's images share a split
    assert items["p1"].caption == "Navy shirt 1. Long sleeve shirt in navy."
    assert items["p1"].image.shape == (48, 64, 3)


def test_jsonl_images_of_any_format_and_size(tmp_path):
    rgba = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
    webp = io.BytesIO()
    solid_image((0, 200, 0), (300, 500)).save(webp, "WEBP", lossless=True)
    jpg = io.BytesIO()
    solid_image((0, 0, 250), (40, 40)).save(jpg, "JPEG", quality=95)
    rows = [dict(product_row(1), image="images/a.png"), dict(product_row(2), image="images/b.webp"),
            dict(product_row(3), image="images/c.jpg")]
    root = write_jsonl(tmp_path, rows, {"images/a.png": rgba, "images/b.webp": webp.getvalue(), "images/c.jpg": jpg.getvalue()})
    items = list(open_catalog(root).items())
    assert items[0].image[0, 0].tolist() == [255, 255, 255]  # transparency flattened onto white
    assert items[1].image.shape == (500, 300, 3)
    model = to_model_image(items[1].image)
    assert model.shape == (256, 256, 3)
    assert model[128, 128].tolist() == [0, 200, 0] and model[128, 0].tolist() == [0, 200, 0]  # padded with the border colour
    assert abs(int(items[2].image[5, 5, 2]) - 250) < 6


@pytest.mark.parametrize("mutate, message", [
    (lambda rows, imgs: rows[1].pop("name") and rows[1].pop("description"), "row 2: missing fields name, description"),
    (lambda rows, imgs: rows[1].pop("subcategory"), "row 2: missing field subcategory"),
    (lambda rows, imgs: rows[2].update(id="p1"), "row 3: duplicate id 'p1' \\(first on line 1\\)"),
    (lambda rows, imgs: rows[1].update(name=" ", description=""), "row 2: empty caption"),
    (lambda rows, imgs: rows[1].update(split="test"), "row 2: split must be one of"),
    (lambda rows, imgs: rows[1].update(price="cheap"), "row 2: price must be a non-negative number"),
    (lambda rows, imgs: rows[1].update(name=["x"]), "row 2: field 'name' must be a string"),
    (lambda rows, imgs: rows[1].update(image="images/missing.png") or imgs.update({"images/missing.png": None}),
     "row 2: image file not found"),
    (lambda rows, imgs: rows.insert(1, "{not json"), "row 2: not valid JSON"),
    (lambda rows, imgs: rows.insert(1, "[1, 2]"), "row 2: each line must be a JSON object"),
    (lambda rows, imgs: rows[2].update(product_id="p2", split="validation") or rows[1].update(split="train"),
     "row 3: product 'p2' is in split 'validation' here but 'train' on line 2"),
])
def test_jsonl_bad_rows_are_named_and_skippable(tmp_path, mutate, message):
    rows = [product_row(i) for i in range(1, 5)]
    images: dict = {}
    mutate(rows, images)
    root = write_jsonl(tmp_path, rows)
    for rel, content in images.items():
        if content is None:
            (root / rel).unlink(missing_ok=True)
    with pytest.raises(CatalogError, match=f"catalog.jsonl, {message}"):
        list(open_catalog(root).items())
    skipping = open_catalog(root, on_error="skip")
    kept = list(skipping.items())
    assert skipping.problems.count == 1 and len(kept) == len(rows) - 1
    assert message.split(": ")[0].replace("\\", "") in skipping.problems.summary()


def test_corrupt_image_is_named_on_read(tmp_path):
    rows = [product_row(1), product_row(2), product_row(3)]
    root = write_jsonl(tmp_path, rows, {"images/p2.png": b"\x89PNG\r\n\x1a\n garbage"})
    catalog = open_catalog(root)
    assert len(catalog.records()) == 3  # texts are fine; the image fails when it is read
    with pytest.raises(CatalogError, match=r"catalog.jsonl, row 2: .*p2.png: not a readable image"):
        list(catalog.items())
    skipping = open_catalog(root, on_error="skip")
    assert [it.id for it in skipping.items()] == ["p1", "p3"]
    assert skipping.problems.count == 1 and "not a readable image" in skipping.problems.first[0]


def test_not_a_catalog(tmp_path):
    with pytest.raises(CatalogError, match="no such file or directory"):
        open_catalog(tmp_path / "nope")
    with pytest.raises(CatalogError, match="not a catalog: expected catalog.jsonl"):
        open_catalog(tmp_path)
    (tmp_path / "catalog.jsonl").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CatalogError, match="not UTF-8"):
        open_catalog(tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        write_jsonl(tmp_path / "ok", [product_row(1)]) and open_catalog(tmp_path / "ok").records("test")


def test_image_hash_is_of_content():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    assert image_hash(a) == image_hash(b)
    b[0, 0, 0] = 1
    assert image_hash(a) != image_hash(b)
    assert image_hash(np.zeros((2, 8, 3), np.uint8)) != image_hash(np.zeros((4, 4, 3), np.uint8))
