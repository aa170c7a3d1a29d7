"""The Dockerfile and the compose file, read: the containers run only CLI commands the host tests run,
every file they name exists, every package the project installs is copied into the images.
tests/test_compose.py builds and runs them for real."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from fashionbert.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PIPELINE = (ROOT / "docker" / "pipeline.sh").read_text()


def container_commands() -> list[list[str]]:
    """Every `fashionbert ...` command a container runs: compose commands, Dockerfile CMDs, the pipeline script."""
    commands = [svc["command"] for svc in COMPOSE["services"].values() if isinstance(svc.get("command"), list)]
    commands += [eval(m) for m in re.findall(r"^CMD (\[.*\])$", DOCKERFILE, re.M)]  # JSON-form CMDs
    for line in PIPELINE.splitlines():
        if "fashionbert " in line and not line.lstrip().startswith("#"):
            commands.append(shlex.split(line[line.index("fashionbert "):].replace('"', "")))
    return [c for c in commands if c and c[0] == "fashionbert"]


def test_containers_run_only_cli_commands_that_parse_and_that_the_tests_run():
    commands = container_commands()
    stages = {tuple(c[1:3]) if c[1] in ("catalog", "index") else (c[1],) for c in commands}
    assert {("catalog", "demo"), ("features",), ("train",), ("calibrate",), ("export",), ("index", "build"), ("serve",)} <= stages
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_docker.py")
    parser = build_parser()
    for command in commands:
        values = {"$DATA": "/data", "$CALIBRATION_N": "1200", "$N": "6000", "$TRAIN_CONFIG": "/app/docker/smoke-train.json",
                  "$EXPORT_QUERIES": "200"}
        args = command[1:]
        for name, value in values.items():
            args = [a.replace(name, value) for a in args]
        parser.parse_args(args)  # exits (fails the test) on an unknown subcommand or option
        stage = " ".join(args[:2] if args[0] in ("catalog", "index") else args[:1])
        quoted = '", "'.join(stage.split())
        assert f'"{quoted}"' in tests or f"'{quoted}'" in tests, f"no host test runs `fashionbert {stage}`"


def test_every_file_the_images_and_compose_name_exists():
    for src in re.findall(r"^COPY (?!--from)(\S+(?: \S+)*?) \S+$", DOCKERFILE, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which does not exist"
    for svc in COMPOSE["services"].values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"compose mounts {source}, which does not exist"
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()
            assert f"AS {build['target']}" in DOCKERFILE, f"no Dockerfile target {build['target']}"
    assert (ROOT / "docker" / "pipeline.sh").stat().st_mode & 0o111, "pipeline.sh must be executable"
    assert (ROOT / "docker" / "base-image.sh").stat().st_mode & 0o111, "base-image.sh must be executable"


def test_the_images_copy_every_package_directory_the_project_installs():
    import tomllib

    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = {src for src in re.findall(r"^COPY (\S+) \./\S+$", DOCKERFILE, re.M)}
    for directory in set(package_dirs.values()):
        top = directory.split("/")[0]
        assert top in copied, f"the Dockerfile does not copy {top}/, which pyproject.toml installs"


def test_api_waits_for_the_pipeline_and_checks_readiness():
    api = COMPOSE["services"]["api"]
    assert api["depends_on"]["pipeline"]["condition"] == "service_completed_successfully"
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert "api:8000" in (ROOT / "docker" / "prometheus.yml").read_text()


def test_compose_publishes_on_loopback_and_serves_prometheus_host_by_default():
    """Secure by default: published on 127.0.0.1 unless FASHIONBERT_BIND says otherwise, no key
    (writes answer 403), and the Host allow-list includes the name Prometheus scrapes by."""
    for name in ("api", "api-gpu", "prometheus"):
        for port in COMPOSE["services"][name]["ports"]:
            assert port.startswith("${FASHIONBERT_BIND:-127.0.0.1}:"), f"{name} publishes {port}"
    for name in ("api", "api-gpu"):
        env = COMPOSE["services"][name]["environment"]
        assert env["FASHIONBERT_API_KEY"] == "${FASHIONBERT_API_KEY:-}"
        assert "api" in env["FASHIONBERT_ALLOWED_HOSTS"].split(":-")[1].rstrip("}").split(",")
    assert "gpu" in COMPOSE["services"]["api-gpu"]["profiles"]
    assert "onnxruntime-gpu" in DOCKERFILE and "faiss-gpu" in DOCKERFILE and "CUDAExecutionProvider" in DOCKERFILE
    serve_stage = DOCKERFILE.split("AS serve\n")[1].split("FROM ")[0]
    assert "torch" not in serve_stage and "pipeline" not in serve_stage  # the serving image has no torch
