"""`fashionbert train` and `fashionbert eval` as a user runs them, including a kill and a resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

TINY_RUN = {"layers": 1, "batch_size": 8, "subcategories_per_batch": 2, "cross_texts": 2, "tia_negatives": 2,
            "epochs": 2, "val_products": 8, "val_queries": 4, "checkpoint_minutes": 0,
            "precision": "fp32", "max_text_len": 32}


def cli(*args):
    return [sys.executable, "-m", "fashionbert.cli", *map(str, args)]


@pytest.fixture(scope="module")
def trained_run(demo_catalog, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY_RUN))
    run = root / "run"
    args = cli("train", "--catalog", demo_catalog, "--out", run, "--config", config, "--features", root / "grid.h5")
    # Start, wait for the first checkpoint, kill the process without warning, then run the same command again.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoint" / "trainer.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    return run, config, resumed.stderr, killed


def test_training_ends_with_the_rerank_stage_and_a_rerun_does_not_repeat_it(trained_run, demo_catalog, tmp_path):
    run, config, _, _ = trained_run
    summary = json.loads((run / "summary.json").read_text())
    stage = summary["rerank_stage"]
    assert stage["steps"] > 0 and stage["pairs"] == stage["steps"] * 6 * 12  # 6 captions, 1 + 11 images each
    meta = json.loads((run / "model" / "config.json").read_text())
    assert meta["rerank_stage"]["steps"] == stage["steps"] and meta["validation"] == stage["validation_after"]

    def rerun(directory, *extra, stage_saved=True):
        shutil.copytree(run, directory)
        (directory / "summary.json").unlink()  # as if it had crashed before the end
        if not stage_saved:  # ... and before the stage's model was saved
            saved = json.loads((directory / "model" / "config.json").read_text())
            saved.pop("rerank_stage")
            (directory / "model" / "config.json").write_text(json.dumps(saved))
        args = cli("train", "--catalog", demo_catalog, "--out", directory, "--config", config,
                   "--features", run.parent / "grid.h5", *extra)
        proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return (directory / "model" / "model.safetensors").read_bytes(), proc.stderr

    weights, stderr = rerun(tmp_path / "after")  # the stage is not trained twice
    assert weights == (run / "model" / "model.safetensors").read_bytes() and "Rerank stage" not in stderr
    # The stage runs; and once the loop is done, the stage's options may change.
    weights, stderr = rerun(tmp_path / "before", "--rerank-steps", "5", stage_saved=False)
    assert "Rerank stage" in stderr and weights != (run / "model" / "model.safetensors").read_bytes()


def test_train_resumes_after_a_kill_and_finishes(trained_run):
    run, _, stderr, killed = trained_run
    assert killed, "training finished before it could be interrupted"
    assert "Resuming" in stderr
    summary = json.loads((run / "summary.json").read_text())
    # Epochs differ by a step or two (leftover products of each grouping are dropped); each ran once.
    assert [h["epoch"] for h in summary["history"]] == [1, 2] and all(h["complete"] for h in summary["history"])
    assert summary["steps"] == summary["history"][-1]["step"] and summary["stopped"] == "2 epochs done"
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == list(range(1, summary["steps"] + 1))  # no step lost, none beyond the plan
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (run / "model" / name).is_file()
    assert (run / "loss_weights.png").stat().st_size > 5000
    record = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert set(record["weights"]) == {"mlm", "mpm", "tia", "itc"} and abs(sum(record["weights"].values()) - 1) < 1e-3
    assert summary["peak_memory_mb"] > 100 and summary["training_minutes"] > 0


def test_a_finished_run_is_not_trained_again(trained_run):
    run, config, _, _ = trained_run
    before = (run / "summary.json").read_text()
    args = cli("train", "--catalog", json.loads(before)["catalog"], "--out", run, "--config", config,
               "--features", run.parent / "grid.h5")
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already trained" in again.stderr
    assert (run / "summary.json").read_text() == before  # the measured time and memory stay


def test_eval_writes_the_paper_table(trained_run, demo_catalog):
    run, *_ = trained_run
    proc = subprocess.run(cli("eval", "--run", run, "--catalog", demo_catalog, "--features", run.parent / "grid.h5",
                              "--queries", 4, "--negatives", 5, "--draws", 2, "--gallery-queries", 6, "--recall-n", 8,
                              "--rerank-k", 4), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Text → image (cross-encoder)" in proc.stdout and "two-tower only" in proc.stdout
    result = json.loads((run / "eval" / "validation.json").read_text())
    assert len(result["paper_protocol"]["t2i"]["R@1"]["draws"]) == 2 and result["paper_protocol"]["candidates"] == 6
    assert 0 <= result["matching"]["auc"] <= 1 and result["full_gallery"]["K"] == 4


def test_train_refuses_bad_settings_and_foreign_runs(trained_run, demo_catalog, tmp_path):
    run, config, *_ = trained_run
    other = dict(TINY_RUN, epochs=3)
    (tmp_path / "other.json").write_text(json.dumps(other))
    proc = subprocess.run(cli("train", "--catalog", demo_catalog, "--out", run, "--config", tmp_path / "other.json",
                              "--features", run.parent / "grid.h5"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "other settings: epochs 2 (asked: 3)" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 1}))
    proc = subprocess.run(cli("train", "--catalog", demo_catalog, "--out", tmp_path / "r", "--config", tmp_path / "bad.json"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown training options: learning_rate" in proc.stderr
    proc = subprocess.run(cli("eval", "--run", tmp_path / "nothing", "--catalog", demo_catalog), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "not a trained FashionBERT model directory" in proc.stderr


def test_calibrate_fits_the_rerank_weight_on_unseen_products_only(trained_run, demo_catalog, tmp_path):
    from fashionbert.catalog.demo import generate
    from fashionbert.runtime.scoring import GRID

    src, *_ = trained_run
    run = tmp_path / "run"  # a copy: the module's other tests read the original
    shutil.copytree(src / "model", run / "model")
    shutil.copy(src / "summary.json", run / "summary.json")
    unseen = generate(tmp_path / "unseen", n=24, seed=5, validation_share=0).out

    def calibrate(catalog, *extra):
        return subprocess.run(cli("calibrate", "--run", run, "--catalog", catalog, "--rerank-k", 5, *extra),
                              capture_output=True, text=True, timeout=300)

    proc = calibrate(demo_catalog)  # the catalog it trained on
    assert proc.returncode == 2 and "never saw" in proc.stderr and "Traceback" not in proc.stderr
    few = generate(tmp_path / "few", n=12, seed=6, validation_share=0).out
    proc = calibrate(few)
    assert proc.returncode == 2 and "at least 20" in proc.stderr
    proc = subprocess.run(cli("calibrate", "--run", tmp_path / "nothing", "--catalog", unseen), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "not a trained FashionBERT model directory" in proc.stderr

    proc = calibrate(unseen)
    assert proc.returncode == 0, proc.stderr
    rerank = json.loads((run / "model" / "config.json").read_text())["rerank"]
    assert rerank["cross_weight"] in GRID and rerank["fitted_on"] == 24 and rerank["K"] == 5
    assert f"rerank weight on the cross-encoder logit {rerank['cross_weight']:g}" in proc.stdout
    assert (run / "calibration-grid.h5").is_file()  # its own features, apart from the training catalog's


def test_the_same_seed_trains_the_same_weights(trained_run, demo_catalog, tmp_path):
    """A rerun with the same settings on the same machine reproduces the model bit for bit (PyTorch's
    multithreaded CPU kernels would otherwise sum in a varying order, and training amplifies that)."""
    from fashionbert.model.train import TrainConfig, train

    run, *_ = trained_run
    cfg = TrainConfig.from_dict(dict(TINY_RUN, epochs=1, rerank_epochs=1))
    weights = []
    for name in ("first", "second"):
        train(demo_catalog, tmp_path / name, cfg, features_path=run.parent / "grid.h5", progress=False)
        weights.append((tmp_path / name / "model" / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]


def test_a_wall_clock_cap_is_an_option_and_a_cut_run_says_so(trained_run, demo_catalog, tmp_path):
    run, config, *_ = trained_run
    # A cap far below one step's time: the loop is cut before its planned steps on any machine.
    proc = subprocess.run(cli("train", "--catalog", demo_catalog, "--out", tmp_path / "cut", "--config", config,
                              "--features", run.parent / "grid.h5", "--max-minutes", "0.0001", "--rerank-steps", "0"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["cut"] and summary["steps"] < summary["planned_steps"]
    assert "Training was cut by its 0.0001-minute cap" in proc.stderr and "without --max-minutes" in proc.stderr
    full = json.loads((run / "summary.json").read_text())  # the uncapped run did all it planned
    assert not full["cut"] and full["stopped"] == "2 epochs done"
