"""The whole HTTP API against its own OpenAPI: schemathesis (pinned) generates valid and invalid
requests for every operation of a real server; no answer may be a server error, and every answer
must match the schema declared for its status (one error body everywhere)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .test_service import API_KEY, Server

ST = Path(sys.executable).parent / "st"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, demo_catalog):
    from fashionbert.catalog.readers import open_catalog
    from fashionbert.index.build import build
    from fashionbert.runtime.exported import ExportedModel

    index = tmp_path_factory.mktemp("contract") / "index"
    build(ExportedModel(tiny_model_dir), open_catalog(demo_catalog), index, progress=False)
    s = Server(tiny_model_dir, index).start()
    yield s
    s.stop()


def test_the_openapi_declares_one_error_body_for_every_operation(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            for status in ("404", "422", "503"):
                schema = op["responses"][status]["content"]["application/json"]["schema"]
                assert schema["$ref"].endswith("/ErrorBody") or path == "/readyz", (method, path, status)


@pytest.mark.timeout(600)
def test_schemathesis_finds_no_server_error_and_no_schema_violation(server, tmp_path):
    """Bounded: a fixed number of cases per operation, a time cap, a fixed seed."""
    run = subprocess.run([str(ST), "--config-file", str(Path(__file__).parent / "schemathesis.toml"), "run",
                          server.url + "/openapi.json", "--checks",
                          "not_a_server_error,response_schema_conformance", "--max-examples", "20", "--seed", "7",
                          "--max-time", "240", "--workers", "2", "--request-timeout", "30", "--no-shrink",
                          "--generation-database", "none", "--header", f"X-API-Key: {API_KEY}",
                          "--report", "junit", "--report-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=560, cwd=tmp_path)  # its caches stay out of the tree
    out = run.stdout + run.stderr
    print(out[-1500:])  # the run's summary, for `pytest -s`
    assert run.returncode == 0, out[-6000:]
    assert "No issues found" in out or "passed" in out.lower(), out[-3000:]
