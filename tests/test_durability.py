"""Writes, hot reloads and a kill -9 together lose nothing acknowledged: bench/durability.py's run, small,
against the tiny exported model. Counts only, no timings: a slow machine runs it longer, not differently."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fashionbert.catalog.readers import open_catalog
from fashionbert.index.build import build
from fashionbert.runtime.exported import ExportedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import durability  # noqa: E402


@pytest.fixture(scope="module")
def index_dir(tiny_model_dir, demo_catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("durability") / "index"
    build(ExportedModel(tiny_model_dir), open_catalog(demo_catalog), out, progress=False)
    return out


def test_acknowledged_writes_survive_reloads_and_a_kill(tiny_model_dir, index_dir, tmp_path):
    """60 writes from 3 threads, at least 6 reloads beside them (two at once now and then) and one
    kill -9 halfway (then a restart): every item answered 201 is there and found by its own image,
    on the live server and again after a clean restart, and SQLite and the newest FAISS vector file
    hold the same number of items."""
    cfg = durability.Config(model=tiny_model_dir, index=index_dir, workdir=tmp_path / "run", writes=60, writers=3,
                            reloads=6, kills=1, reload_interval_s=(0.3, 0.8), threads=1, check_workers=2,
                            max_seconds=600)
    result = durability.run(cfg, log=lambda *_: None)
    report = result.report()
    assert result.kills == 1 and result.reloads_ok >= 6 and result.attempted == 60, report
    assert len(result.acknowledged) > 0, report
    assert not result.failures, report
    # The original index is untouched: the run wrote to its copy.
    assert durability.index_counts(index_dir)[0] == result.base_items
