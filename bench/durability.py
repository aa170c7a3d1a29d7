"""Durability under writes, hot reloads and kill -9: nothing acknowledged is lost.

    .venv/bin/python bench/durability.py --model data/model --index data/index [--writes 500] [--writers 4]
        [--reloads 20] [--kills 2] [--max-seconds 900] [--threads N] [--keep]

Copies the index into a temporary directory (the original is untouched) and starts `fashionbert
serve` on it with an API key. Then, at once: --writers threads POST /items with distinct synthetic
images (seeded random 128x128 PNG patterns, one per item), an admin loop POSTs /admin/reload every
1-2 s (every fifth time two at once: one of them should get a 409), and the server is killed with
SIGKILL --kills times, spread over the writes, and restarted on the same port. The writes keep
pace with the reload attempts (at most --writes / --reloads per attempt; --no-interleave: flat
out), so that writes, reloads and kills overlap on a fast machine too. Writers keep going through
the kills: a connection error or a 503 is retried with the same item; an item counts as
acknowledged only when it was answered 201 (one answered 409 after an attempt whose answer was
lost is "unacknowledged": it may or may not be there).

It runs until every write is done, at least --reloads reloads answered 200 and every kill is done,
or --max-seconds. Then it checks every written id on the live server: GET /items/{id} (present),
POST /search with the item's own image, k 5 (searchable: its id among the results); stops the
server cleanly, starts it again and checks them again; then stops it and reads the index
directory: the SQLite item count against the base count plus the ids present, and against the
vector count of the newest vectors.<gen>.faiss.

Exit status 1 when acknowledged != present or != searchable (before or after the restart), the
counts differ, the server answered a 5xx other than 503 (503 with Retry-After is its back-pressure
and its "loading" answer after a restart; counted apart), a reload answered something other than
200, 409 or 503, or the minimums were not reached in the time allowed.

tests/test_durability.py runs `run` small against the tiny test model.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ holds plain scripts: load.py beside this one
from load import free_port, peak_rss_mb  # noqa: E402

API_KEY = "durability-bench-key"


# Machine and server ------------------------------------------------------------------------------


def cpu_class() -> str:
    """The CPU class the benchmarks are reported by: avx512_bf16, avx512f, avx2 or baseline, with the
    model name."""
    flags, model = set(), platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    klass = next((f for f in ("avx512_bf16", "avx512f", "avx2") if f in flags), "baseline")
    return f"{klass} ({model}, {len(os.sched_getaffinity(0))} cores)"


def rss_mb(pid: int) -> float:
    """The resident set size of a process now (VmRSS), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class ServerProcess:
    """`fashionbert serve` in a subprocess on a fixed 127.0.0.1 port: started, killed (SIGKILL) and
    restarted on the same port and directories. Its output goes to `log_path`."""

    def __init__(self, model: str | Path, index: str | Path, log_path: str | Path, api_key: str | None = API_KEY,
                 **env):
        self.model, self.index, self.log_path = str(model), str(index), Path(log_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **{f"FASHIONBERT_{k.upper()}": str(v) for k, v in env.items() if v is not None}}
        self.env.pop("FASHIONBERT_API_KEY", None)
        if api_key:
            self.env["FASHIONBERT_API_KEY"] = api_key
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout_s: float = 180) -> "ServerProcess":
        with open(self.log_path, "a") as log:
            log.write(f"--- start {self.starts + 1} at {time.strftime('%H:%M:%S')}\n")
            log.flush()
            self.proc = subprocess.Popen([sys.executable, "-m", "fashionbert.cli", "-q", "serve", "--host", "127.0.0.1",
                                          "--port", str(self.port), "--model", self.model, "--index", self.index],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"the server was not ready in {timeout_s:.0f} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, nothing is flushed."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """A clean stop (SIGTERM), SIGKILL after 30 s."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


# Synthetic items ---------------------------------------------------------------------------------


def synthetic_png(seed: int, size: int = 128) -> bytes:
    """A seeded random pattern, distinct per seed: a random colour grid (16x16 cells), a random
    frequency of stripes over it, and fine noise."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = np.kron(cells, np.ones((size // 16, size // 16, 1), dtype=np.uint8)).astype(np.int16)
    yy, xx = np.mgrid[0:size, 0:size]
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.5)
    stripes = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq) > 0)[..., None]
    image = image + stripes * rng.integers(-60, 60, 3) + rng.integers(-12, 12, image.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# The run ------------------------------------------------------------------------------------------


@dataclass
class Config:
    model: str | Path
    index: str | Path  # copied into workdir/index; never written
    workdir: str | Path | None = None  # default: a new temporary directory
    writes: int = 500
    writers: int = 4
    reloads: int = 20  # at least this many answered 200
    kills: int = 2
    reload_interval_s: tuple[float, float] = (1.0, 2.0)
    max_seconds: float = 900
    threads: int | None = None  # FASHIONBERT_THREADS
    check_workers: int = 4  # concurrent GET / search checks
    seed: int = 0
    request_timeout_s: float = 60
    # Writes keep pace with the reload attempts (at most writes / reloads per attempt), so that the
    # writes, the reloads and the kills overlap however fast this machine writes.
    interleave: bool = True


@dataclass
class Result:
    workdir: Path
    attempted: int = 0
    acknowledged: list[str] = field(default_factory=list)
    unacknowledged: list[str] = field(default_factory=list)  # lost answer, then 409: state unknown to the client
    failed: dict[str, str] = field(default_factory=dict)  # id -> last answer, never stored on purpose
    unfinished: list[str] = field(default_factory=list)  # only 503s (or nothing sent) by the time limit
    write_status: Counter = field(default_factory=Counter)
    reload_status: Counter = field(default_factory=Counter)
    kills: int = 0
    restart_s: list[float] = field(default_factory=list)
    fivexx: Counter = field(default_factory=Counter)  # status -> count, 503 included
    fivexx_samples: list[str] = field(default_factory=list)
    live_present: set[str] = field(default_factory=set)  # on the server of the load phase, before the restart
    live_searchable: set[str] = field(default_factory=set)
    present: set[str] = field(default_factory=set)  # after the clean restart
    missing: list[str] = field(default_factory=list)
    searchable: set[str] = field(default_factory=set)
    unsearchable: list[str] = field(default_factory=list)
    base_items: int = 0
    sqlite_items: int = 0
    sqlite_generation: int | None = None
    faiss_file: str = ""
    faiss_vectors: int | None = None
    peak_rss_mb: float = float("nan")
    load_s: float = 0.0
    wall_s: float = 0.0
    timed_out: bool = False
    failures: list[str] = field(default_factory=list)

    @property
    def reloads_ok(self) -> int:
        return self.reload_status.get("200", 0)

    @property
    def other_fivexx(self) -> int:
        return sum(n for s, n in self.fivexx.items() if s != 503)

    def table(self) -> str:
        acked = len(self.acknowledged)
        ack_present = sum(i in self.present for i in self.acknowledged)
        ack_search = sum(i in self.searchable for i in self.acknowledged)
        unack_present = sum(i in self.present for i in self.unacknowledged)
        ack_live_present = sum(i in self.live_present for i in self.acknowledged)
        ack_live_search = sum(i in self.live_searchable for i in self.acknowledged)
        reloads = " / ".join(f"{self.reload_status.get(s, 0)}" for s in ("200", "409"))
        other = {s: n for s, n in sorted(self.reload_status.items()) if s not in ("200", "409")}
        rows = [
            ("writes attempted", f"{self.attempted}"),
            ("acknowledged (201)", f"{acked}"),
            ("present (GET 200), of the acknowledged", f"{ack_present} / {acked}"),
            ("searchable (own image, k 5), of the acknowledged", f"{ack_search} / {acked}"),
            ("before the clean restart: present / searchable", f"{ack_live_present} / {ack_live_search} of {acked}"),
            ("unacknowledged (answer lost, then 409), present", f"{unack_present} / {len(self.unacknowledged)}"),
            ("refused (other 4xx, or gave up)", f"{len(self.failed)}"),
            ("unfinished at the time limit (no answer but 503)", f"{len(self.unfinished)}"),
            ("SQLite items (base + added; expected added)",
             f"{self.sqlite_items} ({self.base_items} + {self.sqlite_items - self.base_items}; {len(self.present)})"),
            ("FAISS vectors (newest vector file)", f"{self.faiss_vectors} ({self.faiss_file or 'none'})"),
            ("SQLite generation", f"{self.sqlite_generation}"),
            ("reloads 200 / 409", reloads),
            ("reloads, other outcomes", ", ".join(f"{s}: {n}" for s, n in other.items()) or "none"),
            ("kill -9 + restart", f"{self.kills} (restart to ready: "
                                  f"{', '.join(f'{s:.1f}' for s in self.restart_s) or '-'} s)"),
            ("server 5xx other than 503", f"{self.other_fivexx}"),
            ("server 503 (busy or loading, retried)", f"{self.fivexx.get(503, 0)}"),
            ("write answers", ", ".join(f"{s}: {n}" for s, n in sorted(self.write_status.items()))),
            ("server peak RSS (last process)", f"{self.peak_rss_mb:.0f} MB"),
            ("wall (load phase / total)", f"{self.load_s:.0f} s / {self.wall_s:.0f} s"
                                          f"{' (stopped at --max-seconds)' if self.timed_out else ''}"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"| {'check'.ljust(width)} | value |", f"| {'-' * width} | --- |"]
        lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
        return "\n".join(lines)

    def report(self) -> str:
        text = self.table()
        if self.fivexx_samples:
            text += "\n\n5xx answers (first few):\n" + "\n".join(self.fivexx_samples)
        if self.failures:
            text += "\n\nFAILED:\n" + "\n".join(f"- {f}" for f in self.failures)
            text += f"\n\nServer log: {self.workdir / 'server.log'}"
        else:
            text += "\n\nPASSED: every acknowledged write is present and searchable; SQLite and FAISS agree."
        return text


def index_counts(index_dir: Path) -> tuple[int, int | None, str, int | None]:
    """(SQLite items, SQLite generation, newest vector file's name, its vector count)."""
    import faiss

    db = sqlite3.connect(f"file:{index_dir / 'items.sqlite'}?mode=ro", uri=True)
    try:
        items = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        try:
            gen = int(db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
        except (sqlite3.Error, TypeError):
            gen = None
    finally:
        db.close()
    files = []
    for p in index_dir.glob("vectors.*.faiss"):
        try:
            files.append((int(p.name.split(".")[1]), p))
        except ValueError:
            continue
    if not files:
        return items, gen, "", None
    newest = max(files)[1]
    return items, gen, newest.name, int(faiss.read_index(str(newest)).ntotal)


def _categories(index_dir: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(f"file:{index_dir / 'items.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT DISTINCT category, subcategory FROM items WHERE category IS NOT NULL "
                          "AND subcategory IS NOT NULL ORDER BY category, subcategory LIMIT 50").fetchall()
    finally:
        db.close()
    return rows or [("TOPS", "SHIRTS")]


def run(cfg: Config, log=print) -> Result:
    """The whole run (see the module docstring); `result.failures` is empty when it passed."""
    started = time.monotonic()
    workdir = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="fashionbert-durability-"))
    workdir.mkdir(parents=True, exist_ok=True)
    index_dir = workdir / "index"
    if index_dir.exists():
        shutil.rmtree(index_dir)
    shutil.copytree(cfg.index, index_dir)
    res = Result(workdir=workdir)
    res.base_items = index_counts(index_dir)[0]
    categories = _categories(index_dir)
    deadline = started + cfg.max_seconds
    lock = threading.Lock()
    stop_admin = threading.Event()
    tag = f"{cfg.seed:x}{int(time.time()) % 100000:05d}"
    ids = [f"dur-{tag}-{i:05d}" for i in range(cfg.writes)]
    images = {}  # id -> base64 PNG, for the searches at the end
    headers = {"X-API-Key": API_KEY}

    server = ServerProcess(cfg.model, index_dir, workdir / "server.log", threads=cfg.threads)
    log(f"Starting the server on {server.url} (index copy in {index_dir}, {res.base_items} items)...")
    server.start()

    def note(status: int, text: str, what: str) -> None:
        if status >= 500:
            with lock:
                res.fivexx[status] += 1
                if status != 503 and len(res.fivexx_samples) < 10:
                    res.fivexx_samples.append(f"{what}: {status} {text[:200]}")

    def retry_after(r: httpx.Response) -> float:
        try:
            return min(float(r.headers.get("Retry-After", 1)), 2.0)
        except ValueError:
            return 1.0

    next_item = iter(range(cfg.writes))

    def reload_attempts() -> int:
        with lock:
            return sum(res.reload_status.values())

    def writer() -> None:
        with httpx.Client(base_url=server.url, timeout=cfg.request_timeout_s) as client:
            while time.monotonic() < deadline:
                while cfg.interleave and time.monotonic() < deadline and \
                        res.attempted >= cfg.writes * (reload_attempts() + 1) / max(cfg.reloads, 1):
                    time.sleep(0.05)
                with lock:
                    i = next(next_item, None)
                    if i is None:
                        return
                    res.attempted += 1
                item_id = ids[i]
                cat, sub = categories[i % len(categories)]
                image = b64(synthetic_png(cfg.seed * 1_000_003 + i))
                images[item_id] = image
                body = {"id": item_id, "image": image, "name": f"Durability item {i}",
                        "description": f"Synthetic pattern {i} written by bench/durability.py.", "category": cat,
                        "subcategory": sub, "metadata": {"price": float(10 + i % 90), "bench": "durability"}}
                lost = False  # an attempt whose answer never came (or was a 5xx): the item may be stored
                errors = 0
                while True:
                    if time.monotonic() > deadline:
                        with lock:
                            (res.unacknowledged if lost else res.unfinished).append(item_id)
                        return
                    try:
                        r = client.post("/items", json=body, headers=headers)
                    except httpx.TransportError as exc:
                        lost = True
                        with lock:
                            res.write_status[type(exc).__name__] += 1
                        time.sleep(0.2)
                        continue
                    note(r.status_code, r.text, f"POST /items {item_id}")
                    with lock:
                        res.write_status[str(r.status_code)] += 1
                    if r.status_code == 201:
                        with lock:
                            res.acknowledged.append(item_id)
                        break
                    if r.status_code == 503:
                        time.sleep(retry_after(r))
                        continue
                    if r.status_code == 409 and lost:
                        with lock:
                            res.unacknowledged.append(item_id)
                        break
                    if r.status_code >= 500 and errors < 5:
                        errors += 1
                        lost = True
                        time.sleep(0.5)
                        continue
                    with lock:
                        (res.unacknowledged.append(item_id) if lost else
                         res.failed.__setitem__(item_id, f"{r.status_code} {r.text[:200]}"))
                    break

    def reload_once() -> None:
        with httpx.Client(base_url=server.url, timeout=cfg.request_timeout_s) as client:
            try:
                r = client.post("/admin/reload", json={}, headers=headers)
            except httpx.TransportError:
                with lock:
                    res.reload_status["no answer"] += 1
                return
        note(r.status_code, r.text, "POST /admin/reload")
        with lock:
            res.reload_status[str(r.status_code)] += 1
            if r.status_code not in (200, 409, 503) and len(res.fivexx_samples) < 10:
                res.fivexx_samples.append(f"POST /admin/reload: {r.status_code} {r.text[:200]}")

    def admin() -> None:
        """A reload every interval; every fifth time two at once (the second should get a 409)."""
        rng = np.random.default_rng(cfg.seed + 1)
        n = 0
        while not stop_admin.wait(rng.uniform(*cfg.reload_interval_s)):
            n += 1
            twin = threading.Thread(target=reload_once, daemon=True) if n % 5 == 0 else None
            if twin:
                twin.start()
            reload_once()
            if twin:
                twin.join()

    threads = [threading.Thread(target=writer, name=f"writer-{n}", daemon=True) for n in range(cfg.writers)]
    admin_thread = threading.Thread(target=admin, name="admin", daemon=True)
    log(f"Writing {cfg.writes} items from {cfg.writers} threads, reloading every {cfg.reload_interval_s[0]:g}-"
        f"{cfg.reload_interval_s[1]:g} s, {cfg.kills} kill -9 spread over the writes...")
    for t in [*threads, admin_thread]:
        t.start()
    try:
        # The kills, at evenly spread shares of the acknowledged writes, while the writers run.
        for j in range(1, cfg.kills + 1):
            threshold = cfg.writes * j / (cfg.kills + 1)
            while len(res.acknowledged) < threshold and any(t.is_alive() for t in threads) \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
            if time.monotonic() >= deadline:
                break
            server.kill()
            res.kills += 1
            t0 = time.monotonic()
            log(f"  kill -9 #{j} after {len(res.acknowledged)} acknowledged writes, {res.reloads_ok} reloads; "
                f"restarting...")
            server.start()
            res.restart_s.append(time.monotonic() - t0)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        while res.reloads_ok < cfg.reloads and time.monotonic() < deadline:
            time.sleep(0.1)
    except BaseException:  # Ctrl-C, or a restart that failed: leave no server behind
        server.kill()
        raise
    finally:
        stop_admin.set()
        admin_thread.join(cfg.request_timeout_s)
    res.timed_out = time.monotonic() >= deadline
    res.load_s = time.monotonic() - started
    # Items still in a writer's hands at the time limit: their state is unknown.
    done = set(res.acknowledged) | set(res.unacknowledged) | set(res.failed) | set(res.unfinished)
    res.unacknowledged += [i for i in ids[:res.attempted] if i not in done]

    log(f"Load phase done in {res.load_s:.0f} s: {len(res.acknowledged)} acknowledged, {res.reloads_ok} reloads, "
        f"{res.kills} kills. Checking every written id on the live server, then after a clean restart...")
    written = ids[:res.attempted]

    def check_all() -> tuple[set[str], set[str]]:
        """(present, searchable) among the written ids, on the server as it is now."""
        present, searchable = set(), set()
        with httpx.Client(base_url=server.url, timeout=cfg.request_timeout_s,
                          limits=httpx.Limits(max_connections=cfg.check_workers)) as client:

            def ask(method: str, path: str, **kw) -> httpx.Response:
                for _ in range(60):
                    try:
                        r = client.request(method, path, **kw)
                    except httpx.TransportError:
                        time.sleep(0.5)
                        continue
                    note(r.status_code, r.text, f"{method} {path}")
                    if r.status_code != 503:
                        return r
                    time.sleep(retry_after(r))
                raise RuntimeError(f"{method} {path}: no answer but 503 or connection errors")

            def check(item_id: str) -> tuple[str, bool, bool]:
                if ask("GET", f"/items/{item_id}").status_code != 200:
                    return item_id, False, False
                r = ask("POST", "/search", json={"image": images[item_id], "k": 5})
                found = r.status_code == 200 and item_id in [x["id"] for x in r.json()["items"]]
                return item_id, True, found

            with ThreadPoolExecutor(cfg.check_workers) as pool:
                for item_id, is_present, found in pool.map(check, written):
                    if is_present:
                        present.add(item_id)
                    if found:
                        searchable.add(item_id)
        return present, searchable

    try:
        res.live_present, res.live_searchable = check_all()
        server.stop()
        server.start()
        res.present, res.searchable = check_all()
        res.peak_rss_mb = peak_rss_mb(server.pid)
    finally:
        server.stop()
    res.missing = [i for i in res.acknowledged if i not in res.present]
    res.unsearchable = [i for i in res.acknowledged if i in res.present and i not in res.searchable]
    res.sqlite_items, res.sqlite_generation, res.faiss_file, res.faiss_vectors = index_counts(index_dir)
    res.wall_s = time.monotonic() - started

    f = res.failures
    if res.missing:
        f.append(f"{len(res.missing)} acknowledged item(s) are missing after the restart, e.g. {res.missing[:3]}")
    if res.unsearchable:
        f.append(f"{len(res.unsearchable)} acknowledged item(s) are present but not found by their own image, "
                 f"e.g. {res.unsearchable[:3]}")
    live_lost = [i for i in res.acknowledged if i not in res.live_present or i not in res.live_searchable]
    if live_lost:
        f.append(f"{len(live_lost)} acknowledged item(s) were not present and searchable on the live server before "
                 f"the clean restart, e.g. {live_lost[:3]}")
    lost_unknown = [i for i in res.present if i not in res.searchable]
    if len(lost_unknown) > len(res.unsearchable):
        f.append(f"{len(lost_unknown) - len(res.unsearchable)} unacknowledged item(s) are present but not searchable")
    if res.sqlite_items != res.base_items + len(res.present):
        f.append(f"SQLite holds {res.sqlite_items} items, expected {res.base_items} + {len(res.present)} present")
    if res.faiss_vectors != res.sqlite_items:
        f.append(f"FAISS ({res.faiss_file or 'no vector file'}) holds {res.faiss_vectors} vectors, SQLite "
                 f"{res.sqlite_items} items")
    if res.other_fivexx:
        f.append(f"the server answered {res.other_fivexx} 5xx other than 503")
    odd = {s: n for s, n in res.reload_status.items() if s not in ("200", "409", "503", "no answer")}
    if odd:
        f.append(f"reloads answered {odd}")
    if res.failed:
        first = next(iter(res.failed.items()))
        f.append(f"{len(res.failed)} write(s) refused, e.g. {first[0]}: {first[1]}")
    finished = len(res.acknowledged) + len(res.unacknowledged) + len(res.failed)
    if finished < cfg.writes or res.reloads_ok < cfg.reloads or res.kills < cfg.kills:
        f.append(f"the minimums were not reached within {cfg.max_seconds:.0f} s: {finished} of {cfg.writes} "
                 f"writes answered, {res.reloads_ok} of {cfg.reloads} reloads, {res.kills} of {cfg.kills} kills")
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="data/model")
    parser.add_argument("--index", default="data/index", help="copied; the original is not written")
    parser.add_argument("--writes", type=int, default=500)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--reloads", type=int, default=20, help="at least this many reloads answered 200")
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--reload-interval", default="1,2", help="seconds between reloads: min,max")
    parser.add_argument("--max-seconds", type=float, default=900, help="time limit of the load phase")
    parser.add_argument("--threads", type=int, help="FASHIONBERT_THREADS of the server (default: all cores)")
    parser.add_argument("--check-workers", type=int, default=4)
    parser.add_argument("--no-interleave", action="store_true", help="write as fast as possible, not at most "
                                                                     "writes/reloads per reload attempt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="where the index copy and server log go (default: a temporary directory, "
                                          "removed after a pass unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory after a pass")
    args = parser.parse_args()
    lo, hi = (float(x) for x in args.reload_interval.split(","))
    print(f"Machine: CPU class {cpu_class()}, {platform.machine()}; {time.strftime('%Y-%m-%d')}.")
    print(f"Command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    cfg = Config(model=args.model, index=args.index, workdir=args.workdir, writes=args.writes, writers=args.writers,
                 reloads=args.reloads, kills=args.kills, reload_interval_s=(lo, hi), max_seconds=args.max_seconds,
                 threads=args.threads, check_workers=args.check_workers, seed=args.seed,
                 interleave=not args.no_interleave)
    res = run(cfg)
    print()
    print(res.report(), flush=True)
    if not res.failures and not args.keep and not args.workdir:
        shutil.rmtree(res.workdir, ignore_errors=True)
    elif args.keep or res.failures:
        print(f"Work directory kept: {res.workdir}")
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
