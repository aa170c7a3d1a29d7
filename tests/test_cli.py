"""The `fashionbert` command as a user runs it: real processes, real files, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import product_row, write_jsonl


def fashionbert(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "fashionbert.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_demo_check_features_end_to_end(tmp_path):
    cat = tmp_path / "demo"
    out = fashionbert("catalog", "demo", "--out", cat, "--n", 10, "--seed", 1)
    assert "Wrote a jsonl demo catalog of 10 products" in out.stderr
    assert len((cat / "catalog.jsonl").read_text().splitlines()) == 10
    check = fashionbert("catalog", "check", "--catalog", cat)
    assert "10 images of 10 products" in check.stdout and "no problems found" in check.stdout
    feats = fashionbert("features", "--catalog", cat, "--out", tmp_path / "f.h5", "--mode", "global", "--precision", "fp32")
    assert "computed 10" in feats.stderr and "Patch features (global)" in feats.stderr  # the progress bar
    again = fashionbert("features", "--catalog", cat, "--out", tmp_path / "f.h5", "--mode", "global", "--precision", "fp32")
    assert "computed 0" in again.stderr and "reused 10 unchanged" in again.stderr
    sheet = fashionbert("catalog", "contact-sheet", "--catalog", cat, "--out", tmp_path / "sheet.png", "--n", 4)
    assert (tmp_path / "sheet.png").stat().st_size > 10_000, sheet.stderr


def test_fashiongen_format_from_the_cli(tmp_path):
    fashionbert("catalog", "demo", "--out", tmp_path / "fg", "--n", 6, "--format", "fashiongen")
    check = fashionbert("catalog", "check", "--catalog", tmp_path / "fg", "--split", "validation")
    assert "(fashiongen)" in check.stdout and "splits: validation 1" in check.stdout


@pytest.mark.parametrize("args, message", [
    (["catalog", "check", "--catalog", "{tmp}/missing"], "no such file or directory"),
    (["features", "--catalog", "{tmp}", "--out", "{tmp}/f.h5"], "not a catalog"),
    (["catalog", "demo", "--out", "{tmp}/d", "--n", "0"], "--n must be at least 1"),
])
def test_errors_are_one_clear_line(tmp_path, args, message):
    proc = fashionbert(*[a.format(tmp=tmp_path) for a in args], check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_bad_rows_stop_or_are_reported(tmp_path):
    rows = [product_row(1), product_row(2), {**product_row(3), "id": "p1"}]
    root = write_jsonl(tmp_path / "c", rows)
    stop = fashionbert("catalog", "check", "--catalog", root, check=False)
    assert stop.returncode == 2 and "row 3: duplicate id 'p1'" in stop.stderr and "Traceback" not in stop.stderr
    report = fashionbert("catalog", "check", "--catalog", root, "--skip-bad", check=False)
    assert report.returncode == 1 and "1 rows skipped" in report.stdout and "duplicate id" in report.stdout
    feats = fashionbert("features", "--catalog", root, "--out", tmp_path / "f.h5", "--mode", "global", "--skip-bad")
    assert "Features for 2 images" in feats.stderr and "Skipped bad rows: 1 rows skipped" in feats.stderr


def test_existing_demo_is_not_overwritten(tmp_path):
    fashionbert("catalog", "demo", "--out", tmp_path / "d", "--n", 2)
    proc = fashionbert("catalog", "demo", "--out", tmp_path / "d", "--n", 3, check=False)
    assert proc.returncode == 2 and "pass --overwrite" in proc.stderr
    assert len((tmp_path / "d" / "catalog.jsonl").read_text().splitlines()) == 2
    assert all(json.loads(l)["id"] for l in (tmp_path / "d" / "catalog.jsonl").read_text().splitlines())


def test_the_cli_explains_itself():
    import argparse

    from fashionbert.cli import _subparsers, build_parser

    parser = build_parser()
    top = fashionbert("--help").stdout
    stages = ["catalog", "features", "train", "eval", "calibrate", "export", "index", "serve"]
    listed = [line.split()[0] for line in top.splitlines() if line.startswith("    ") and line.split()[0] in stages]
    assert listed == stages  # in the order data flows
    for sub in _subparsers(parser):
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{sub.prog} {'/'.join(action.option_strings) or action.dest}: no help line"
    build_help = fashionbert("index", "build", "--help").stdout
    assert "(default: 16)" in " ".join(build_help.split())  # defaults are shown


def test_train_help_states_the_training_configs_defaults():
    import re

    from fashionbert.cli import build_parser
    from fashionbert.model.config import TrainConfig

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    defaults = TrainConfig()
    # Fields whose None means a value the config resolves itself: the help states that value first.
    resolved = {"patch_pool": defaults.pool}
    checked = 0
    for action in train._actions:
        stated = re.search(r"\(default ([^;),]+)", action.help or "")
        if stated and hasattr(defaults, action.dest):
            value = getattr(defaults, action.dest)
            if action.dest in resolved:
                assert stated.group(1).split()[0] == str(resolved[action.dest]), (action.dest, stated.group(1))
                checked += 1
                continue
            assert stated.group(1) == str(value) or (value is None and stated.group(1).startswith(("all", "no"))), \
                f"--{action.dest}: help says {stated.group(1)}, TrainConfig has {value}"
            checked += 1
    assert checked >= 4


def test_serve_listens_where_the_environment_says_and_refuses_a_bad_port(monkeypatch):
    # Containers set FASHIONBERT_HOST/PORT (docker-compose.yml); flags still win.
    from fashionbert.cli import build_parser

    monkeypatch.setenv("FASHIONBERT_HOST", "0.0.0.0")
    monkeypatch.setenv("FASHIONBERT_PORT", "8123")
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port) == ("0.0.0.0", 8123)
    assert build_parser().parse_args(["serve", "--port", "9000"]).port == 9000
    monkeypatch.delenv("FASHIONBERT_HOST")
    monkeypatch.delenv("FASHIONBERT_PORT")
    assert (build_parser().parse_args(["serve"]).host, build_parser().parse_args(["serve"]).port) == ("127.0.0.1", 8000)
    for bad in ("http", "0", "70000"):
        proc = subprocess.run([sys.executable, "-m", "fashionbert.cli", "serve"], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "FASHIONBERT_PORT": bad})
        assert proc.returncode == 2 and "is not a port number" in proc.stderr and "Traceback" not in proc.stderr
