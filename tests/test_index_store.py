"""The index directory shared: several CatalogIndex objects and processes writing one directory, opening
it while it changes, serving it from a read-only directory, and closing it.

Real FAISS, SQLite and files throughout. Nothing here waits for a time to pass: concurrent runs start
together (barriers, a "go" line) and are checked for what they leave, whatever their interleaving.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from fashionbert.catalog.readers import open_catalog
from fashionbert.index.build import build
from fashionbert.index.store import CatalogIndex, Filters, IndexConfig, IndexError_, ReadOnlyIndex
from fashionbert.runtime.exported import ExportedModel

KINDS = [IndexConfig(kind="flat"), IndexConfig(kind="ivf", nlist=2, nprobe=2)]  # ivf probing every list: exact


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def model(model_dir):
    return ExportedModel(model_dir, variant="fp32")


@pytest.fixture(scope="module")
def items(demo_catalog):
    return list(open_catalog(demo_catalog).items())


@pytest.fixture(scope="module")
def emb(model, items) -> dict[str, np.ndarray]:
    """Every item's image embedding, by id."""
    e, _ = model.encode_images(np.stack([it.image for it in items]))
    return {it.id: e[i] for i, it in enumerate(items)}


@pytest.fixture(scope="module")
def train_ids(items):
    return [it.id for it in items if it.split == "train"]


@pytest.fixture(scope="module")
def new(items):
    """The items the tests add: the validation split, left out of the built index."""
    return [it for it in items if it.split == "validation"]


def make_index(model, demo_catalog, path: Path, cfg: IndexConfig = IndexConfig()) -> Path:
    build(model, open_catalog(demo_catalog), path, cfg, split="train", progress=False)
    return path


def faiss_ids(index) -> set[int]:
    """The ids stored in a FAISS index (an IDMap2 over flat, or an IVF)."""
    if isinstance(index, faiss.IndexIDMap2):
        return set(faiss.vector_to_array(index.id_map).tolist())
    ivf = faiss.extract_index_ivf(index)
    out = set()
    for lst in range(ivf.nlist):
        n = ivf.invlists.list_size(lst)
        if n:
            out.update(faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), n).tolist())
    return out


def assert_complete(directory: Path, expected_ids: set[str], emb: dict, *opened: CatalogIndex) -> None:
    """SQLite holds exactly these ids; the vector file of its generation holds every row; each
    instance given, and a fresh one, has as many vectors as items and finds each item by its own
    embedding."""
    fresh = CatalogIndex(directory)
    try:
        rows = fresh.rows_of(sorted(expected_ids))
        assert set(rows) == expected_ids and len(fresh) == len(expected_ids)
        files = sorted(directory.glob("vectors.*.faiss"))
        assert [p.name for p in files] == [f"vectors.{fresh.generation()}.faiss"]
        assert faiss_ids(faiss.read_index(str(files[0]))) == set(rows.values())
        for index in (*opened, fresh):
            assert len(index) == index.faiss.ntotal == len(expected_ids)
            assert faiss_ids(index.faiss) == set(rows.values())
            for item_id in sorted(expected_ids):
                assert index.search(emb[item_id], 1)[0].id == item_id
    finally:
        fresh.close()


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every entry of the directory (and the directory itself): size and modification time."""
    out = {".": (0, os.stat(directory).st_mtime_ns)}
    for p in directory.iterdir():
        st = p.stat()
        out[p.name] = (st.st_size, st.st_mtime_ns)
    return out


def open_files_under(directory: Path) -> list[str]:
    """This process's open files and memory maps inside the directory."""
    root = os.path.realpath(directory) + os.sep
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(root):
                found.append(target)
    with open("/proc/self/maps") as f:
        found += [line.split()[-1] for line in f if line.rstrip().split()[-1].startswith(root)]
    return found


def run_threads(targets) -> list[BaseException]:
    """Run these functions in threads started together; the exceptions they raised."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(targets))

    def wrap(fn):
        try:
            barrier.wait()
            fn()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


# Several instances of one directory --------------------------------------------------------------


@pytest.mark.parametrize("cfg", KINDS, ids=lambda c: c.kind)
def test_two_instances_writing_in_turn_see_and_save_each_others_items(model, demo_catalog, tmp_path, emb, train_ids,
                                                                      new, cfg):
    # As during a reload: the old engine's index and the new one's, both taking writes.
    d = make_index(model, demo_catalog, tmp_path / "idx", cfg)
    a, b = CatalogIndex(d), CatalogIndex(d)
    expected = set(train_ids)
    for i, it in enumerate(new[:16]):
        writer, other = (a, b) if i % 2 == 0 else (b, a)
        writer.add([it], model)
        expected.add(it.id)
        assert other.search(emb[it.id], 1)[0].id == it.id  # the other instance finds it at once
        assert len(a) == a.faiss.ntotal == len(b) == b.faiss.ntotal == len(expected)
    for i, it in enumerate(new[:4]):  # deletes through either, of items either added
        assert (b if i % 2 == 0 else a).delete([it.id]) == []
        expected.discard(it.id)
        assert it.id not in [h.id for h in (a if i % 2 == 0 else b).search(emb[it.id], len(expected))]
    a.add(new[:1], model)  # deleted through b, added again through a
    expected.add(new[0].id)
    assert_complete(d, expected, emb, a, b)
    a.close()
    b.close()


@pytest.mark.parametrize("cfg", KINDS, ids=lambda c: c.kind)
def test_two_instances_writing_at_once_from_threads_lose_nothing(model, demo_catalog, tmp_path, emb, train_ids, new,
                                                                 cfg):
    d = make_index(model, demo_catalog, tmp_path / "idx", cfg)
    a, b = CatalogIndex(d), CatalogIndex(d)
    slices = [new[i::4] for i in range(4)]  # two writer threads per instance, each with its own items
    done = threading.Event()

    def writer(index, mine):
        def run():
            for it in mine:
                index.add([it], model)
            index.delete([it.id for it in mine[::3]])
        return run

    def searcher(index):
        def run():
            query = emb[train_ids[0]]
            while not done.is_set():
                hits = index.search(query, 10)
                assert len(hits) == 10 and hits[0].id == train_ids[0]
        return run

    writers = [writer(a, slices[0]), writer(a, slices[1]), writer(b, slices[2]), writer(b, slices[3])]

    def writers_then_stop():
        errors = run_threads(writers)
        done.set()
        if errors:
            raise errors[0]

    errors = run_threads([writers_then_stop, searcher(a), searcher(b)])
    assert not errors, errors[0]
    expected = set(train_ids) | {it.id for s in slices for it in s} - {it.id for s in slices for it in s[::3]}
    assert_complete(d, expected, emb, a, b)
    a.close()
    b.close()


WRITER = textwrap.dedent("""
    import json, sys
    from fashionbert.catalog.readers import open_catalog
    from fashionbert.index.store import CatalogIndex
    from fashionbert.runtime.exported import ExportedModel
    model_dir, index_dir, catalog, mode, ids = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
    model = ExportedModel(model_dir, variant="fp32")
    items = [it for it in open_catalog(catalog).items() if it.id in set(ids)]
    index = CatalogIndex(index_dir, model_hash=model.model_hash)
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    if mode == "add":  # one item at a time, then a third of them deleted again
        for it in items:
            index.add([it], model)
        index.delete([it.id for it in items[::3]])
    else:  # "cycle": add and delete all of them, round after round, until told to stop
        import select
        rounds = 0
        while not select.select([sys.stdin], [], [], 0)[0]:
            index.add(items, model)
            index.delete([it.id for it in items])
            rounds += 1
        print("rounds", rounds, flush=True)
    index.close()
""")


def start_writer(model_dir, index_dir, catalog, mode, ids) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(model_dir), str(index_dir), str(catalog), mode,
                             json.dumps(ids)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    assert line == "ready\n", line + proc.stderr.read()
    return proc


def go(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out


def test_two_processes_adding_at_once_lose_nothing(model, model_dir, demo_catalog, tmp_path, emb, train_ids, new):
    # The server and `fashionbert index add`, say: one directory, two processes, writes interleaved.
    d = make_index(model, demo_catalog, tmp_path / "idx", KINDS[0])
    watcher = CatalogIndex(d)  # opened before, written by neither
    halves = [new[0::2], new[1::2]]
    procs = [start_writer(model_dir, d, demo_catalog, "add", [it.id for it in half]) for half in halves]
    for proc in procs:
        go(proc)
    for proc in procs:
        finish(proc)
    expected = set(train_ids) | {it.id for h in halves for it in h} - {it.id for h in halves for it in h[::3]}
    assert_complete(d, expected, emb, watcher)
    watcher.close()


@pytest.mark.parametrize("writer_kind", ["thread", "process"])
def test_an_index_opened_while_another_writes_always_opens_a_committed_state(model, model_dir, demo_catalog, tmp_path,
                                                                             emb, train_ids, new, writer_kind):
    # Each write saves vectors.<gen+1>.faiss and removes vectors.<gen>.faiss: an open never reads
    # a generation whose file is gone, and what it loads is a state some commit made.
    d = make_index(model, demo_catalog, tmp_path / "idx", KINDS[0])
    batch = new[:3]
    with CatalogIndex(d) as probe:
        start_gen = probe.generation()
    stop, errors, rounds = threading.Event(), [], [0]
    if writer_kind == "process":
        proc = start_writer(model_dir, d, demo_catalog, "cycle", [it.id for it in batch])
        go(proc)
    else:
        proc = None

        def cycle():
            writer = CatalogIndex(d)
            try:
                while not stop.is_set():
                    writer.add(batch, model)
                    writer.delete([it.id for it in batch])
                    rounds[0] += 1
            except BaseException as exc:  # reported below
                errors.append(exc)
            finally:
                writer.close()

        thread = threading.Thread(target=cycle)
        thread.start()
    try:
        probe = CatalogIndex(d)
        deadline = time.monotonic() + 300  # a hang guard only
        while probe.generation() < start_gen + 2 and time.monotonic() < deadline:  # the writer is under way
            time.sleep(0.01)
        assert probe.generation() >= start_gen + 2
        probe.close()
        for _ in range(25):
            opened = CatalogIndex(d)
            assert opened.faiss.ntotal in (len(train_ids), len(train_ids) + len(batch))  # a committed state
            assert opened.search(emb[train_ids[1]], 1)[0].id == train_ids[1]
            opened.close()
    finally:
        if proc is not None:
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            out = finish(proc)
            rounds[0] = int(out.split()[-1])
        else:
            stop.set()
            thread.join()
    assert not errors, errors[0]
    assert rounds[0] >= 1
    assert_complete(d, set(train_ids), emb)


def test_a_write_to_a_directory_rebuilt_since_it_was_opened_is_refused(model, demo_catalog, tmp_path, new, train_ids):
    d = make_index(model, demo_catalog, tmp_path / "idx", KINDS[0])
    old = CatalogIndex(d)
    build(model, open_catalog(demo_catalog), d, split="train", overwrite=True, progress=False)
    with pytest.raises(IndexError_, match="was replaced"):
        old.add(new[:1], model)
    rebuilt = CatalogIndex(d)
    assert len(rebuilt) == rebuilt.faiss.ntotal == len(train_ids)
    old.close()
    rebuilt.close()


# Read-only ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def read_only_mount(source: Path, target: Path):
    """`source` bind-mounted read-only at `target`, or the test skipped where mounting is not allowed."""
    target.mkdir()
    proc = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {proc.stderr.strip()}")
    try:
        proc = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {proc.stderr.strip()}")
        with pytest.raises(OSError, match="Read-only file system"):
            (target / "probe").touch()
        yield target
    finally:
        gc.collect()
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], check=True)


def check_read_only(index: CatalogIndex, model, emb, expected: list[str], new) -> None:
    """Reads and searches work, from several threads; writes raise ReadOnlyIndex."""
    assert index.read_only and index.info()["read_only"] and len(index) == len(expected)
    assert index.faiss.ntotal == len(expected)
    errors = run_threads([lambda i=i: assert_finds(index, emb, expected[i::3]) for i in range(3)])
    assert not errors, errors[0]
    item = index.item(expected[0])
    assert item["id"] == expected[0] and index.image(expected[0])[:2] == b"\xff\xd8"
    assert index.patches.read([item["row"]]).shape[0] == 1
    assert index.count(Filters(category=item["category"])) >= 1
    with pytest.raises(ReadOnlyIndex, match="index directory is read-only.*needs a writable index directory"):
        index.add([it for it in new if it.id not in expected][:1], model)
    with pytest.raises(ReadOnlyIndex, match="read-only"):
        index.delete(expected[:1])
    assert len(index) == len(expected)


def assert_finds(index: CatalogIndex, emb, ids: list[str]) -> None:
    for item_id in ids:
        assert index.search(emb[item_id], 1)[0].id == item_id


def test_a_read_only_mount_is_served_and_left_untouched(model, demo_catalog, tmp_path, emb, train_ids, new):
    src = make_index(model, demo_catalog, tmp_path / "idx", KINDS[0])
    with CatalogIndex(src) as writer:  # written once: a WAL database and a lock file, as a served index has
        writer.add(new[:2], model)
    expected = train_ids + [it.id for it in new[:2]]
    before = snapshot(src)
    assert "index.lock" in before and "items.sqlite-wal" not in before
    with read_only_mount(src, tmp_path / "ro") as ro:
        index = CatalogIndex(ro)  # found read-only
        check_read_only(index, model, emb, expected, new)
        with pytest.raises(IndexError_, match="read-only"):
            CatalogIndex(ro, read_only=False)
        index.close()
        assert not open_files_under(ro)
    assert snapshot(src) == before


def test_a_read_only_mount_whose_vectors_are_behind_is_rebuilt_in_memory(model, demo_catalog, tmp_path, emb, train_ids,
                                                                         new, caplog):
    src = make_index(model, demo_catalog, tmp_path / "idx", KINDS[1])
    saved = tmp_path / "vectors.1.faiss"
    shutil.copy(src / "vectors.1.faiss", saved)
    with CatalogIndex(src) as writer:
        writer.add(new[:3], model)
    # As if the writer had died between its commit and writing vectors.2.faiss.
    (src / "vectors.2.faiss").unlink()
    shutil.copy(saved, src / "vectors.1.faiss")
    before = snapshot(src)
    expected = train_ids + [it.id for it in new[:3]]
    with read_only_mount(src, tmp_path / "ro") as ro:
        with caplog.at_level(logging.WARNING, logger="fashionbert.index.store"):
            index = CatalogIndex(ro)
        assert "in memory only" in caplog.text
        check_read_only(index, model, emb, expected, new)
        index.close()
    assert snapshot(src) == before
    assert_complete(src, set(expected), emb)  # opened writable, it heals the directory


def test_a_read_only_mount_follows_a_writer_on_the_writable_side(model, demo_catalog, tmp_path, emb, train_ids, new):
    # A live writer keeps items.sqlite-wal and -shm: the read-only side reads through them.
    src = make_index(model, demo_catalog, tmp_path / "idx", KINDS[0])
    writer = CatalogIndex(src)
    writer.add(new[:1], model)
    with read_only_mount(src, tmp_path / "ro") as ro:
        reader = CatalogIndex(ro)
        assert reader.read_only and len(reader) == len(train_ids) + 1
        writer.add(new[1:3], model)
        writer.delete([new[0].id])
        assert_finds(reader, emb, [it.id for it in new[1:3]] + train_ids[:3])
        assert reader.faiss.ntotal == len(reader) == len(train_ids) + 2
        assert new[0].id not in [h.id for h in reader.search(emb[new[0].id], 10)]
        reader.close()
    writer.close()


def test_a_read_only_mount_opened_before_the_writer_starts_follows_it(model, demo_catalog, tmp_path, emb, train_ids,
                                                                      new):
    # A replica that starts first finds no -wal and reads the file as immutable; once a writer
    # starts beside it (compose's writer and read-only replica start together), it must follow.
    src = make_index(model, demo_catalog, tmp_path / "idx", KINDS[0])
    with read_only_mount(src, tmp_path / "ro") as ro:
        reader = CatalogIndex(ro)
        assert len(reader) == len(train_ids)
        writer = CatalogIndex(src)
        writer.add(new[:2], model)
        assert len(reader) == len(train_ids) + 2
        assert_finds(reader, emb, [it.id for it in new[:2]])
        writer.delete([new[0].id])
        writer.close()  # checkpointed: the -wal is gone again, the file changed
        assert len(reader) == len(train_ids) + 1
        assert new[0].id not in [h.id for h in reader.search(emb[new[0].id], 10)]
        reader.close()


@pytest.mark.parametrize("written", [False, True], ids=["as-built", "written-since"])
def test_read_only_true_creates_and_changes_nothing(model, demo_catalog, tmp_path, emb, train_ids, new, written):
    d = make_index(model, demo_catalog, tmp_path / "idx", IndexConfig(patch_dtype="int8"))  # patch_scales.bin too
    expected = list(train_ids)
    if written:  # a WAL database, a lock file and a later vector file
        with CatalogIndex(d) as writer:
            writer.add(new[:2], model)
        expected += [it.id for it in new[:2]]
    before = snapshot(d)
    index = CatalogIndex(d, read_only=True)
    check_read_only(index, model, emb, expected, new)
    index.close()
    assert snapshot(d) == before
    assert not open_files_under(d)


# close() -----------------------------------------------------------------------------------------


def test_close_releases_every_file_and_leaves_other_instances_working(model, demo_catalog, tmp_path, emb, train_ids,
                                                                      new):
    d = make_index(model, demo_catalog, tmp_path / "idx", KINDS[0])
    retired, current = CatalogIndex(d), CatalogIndex(d)

    def use(index):
        def run():
            hits = index.search(emb[train_ids[2]], 5)
            index.patches.read([h.row for h in hits])
            index.item(hits[0].id)
        return run

    assert not run_threads([use(retired) for _ in range(3)])
    current.add(new[:1], model)
    assert retired.search(emb[new[0].id], 1)[0].id == new[0].id
    retired.close()
    retired.close()  # twice is fine
    with pytest.raises(IndexError_, match="closed"):
        retired.search(emb[train_ids[0]], 1)
    with pytest.raises(IndexError_, match="closed"):
        len(retired)
    with pytest.raises(IndexError_, match="closed"):
        retired.patches.read([1])
    # What remains open is the other instance's only.
    held = open_files_under(d)
    current.close()
    assert not open_files_under(d) and held
    again = CatalogIndex(d)
    assert_finds(again, emb, [new[0].id, train_ids[0]])
    again.add(new[1:2], model)
    again.close()
    assert_complete(d, set(train_ids) | {new[0].id, new[1].id}, emb)
