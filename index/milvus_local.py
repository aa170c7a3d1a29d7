"""A Milvus standalone server on this machine (the PyPI `milvus` package: the real server binary,
run as a child process), on loopback: for the tests, the benchmarks and single-machine trials.
Production runs a Milvus cluster instead (docs/scaling.md)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalMilvus:
    """Its data under `base`; `start()` waits until a client gets through, and a restart keeps the port."""

    def __init__(self, base: str | Path, port: int | None = None):
        self.base, self.port = Path(base), port or free_port()
        self.server = None

    def start(self, wait_s: float = 120) -> "LocalMilvus":
        from milvus import MilvusServer, MilvusServerConfig

        from .milvus import MilvusError, MilvusRecall
        from .vectors import IndexConfig

        class Config(MilvusServerConfig):
            def try_bind_port(self, port):
                # The package probes its ports without SO_REUSEADDR, so a port with connections of
                # a killed server in TIME_WAIT looks taken and it moves to the next one; the
                # server itself (Go) reuses it. A restart must keep its port.
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                    sock.listen()
                    return sock
                except OSError:
                    sock.close()
                    return None

        self.server = MilvusServer(Config())
        self.server.set_base_dir(str(self.base))
        self.server.listen_port = self.port
        # Its components find each other on loopback (default: the first network address), and a
        # killed server's registrations expire in 5 s rather than 30, so a restart is quick.
        for component in COMPONENTS:
            self.server.config.set(f"{component}.ip", "127.0.0.1")
        self.server.config.set("common.session.ttl", 5)
        self.server.start()
        if self.server.listen_port != self.port:
            raise RuntimeError(f"Milvus moved from port {self.port} to {self.server.listen_port}")
        deadline = time.monotonic() + wait_s
        while True:  # healthy is not yet serving: wait until a client gets through
            try:
                MilvusRecall(self.uri("never_built"), 2, IndexConfig(), "x", timeout=5)
            except MilvusError as exc:
                if "no such collection" in str(exc):
                    return self
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def stop(self) -> None:
        self.server.stop()

    def kill(self) -> None:
        """kill -9 of the server process (what a crash looks like)."""
        self.server.server_proc.kill()
        self.server.server_proc.wait(30)

    def uri(self, collection: str) -> str:
        return f"milvus://127.0.0.1:{self.port}/{collection}"
