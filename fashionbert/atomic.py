"""Writing files and directories so that readers, and a crash at any moment, see the old version
or the new one, never a half-written one. Every write that replaces something goes through here.

    with staged_file(path) as tmp:    # any writer that takes a file name (h5py, faiss, safetensors)
        h5py.File(tmp, "w") ...
    write_text(path, text)            # small files: JSON, stamps
    with staged_dir(target) as tmp:   # a whole directory (an export, an index build, a demo catalog)
        ...
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def replace_dir(new: Path, target: Path) -> None:
    """Put directory `new` at `target`, replacing what is there; `new` is gone afterwards."""
    new, target = Path(new), Path(target)
    if not target.exists():
        new.rename(target)
    elif _exchange(new, target):
        shutil.rmtree(new)  # now holds the previous contents
    else:
        # Two renames: a crash between them leaves the previous contents beside the target.
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old)
    _fsync(target.parent)


def _fsync(path: Path) -> None:
    """A file's bytes, or a directory's entries, onto the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path) -> str:
    """Hidden, beside `path`, unique per process and call (the process id first, for cleanup)."""
    return f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside `path` to write to; renamed over `path` (after an fsync) when the
    block ends without an error, removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(_temp_name(path))
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with staged_file(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


@contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """An empty directory beside `target` to fill; put at `target` (replace_dir) when the block
    ends without an error, removed when it raises. Leftovers of killed runs (their process gone)
    are removed first; another live run's are left alone."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        pid = stale.name.split(".tmp-", 1)[1].split("-")[0]
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / _temp_name(target)
    tmp.mkdir()
    try:
        yield tmp
        # Every file's bytes on disk before the rename makes them the target's: after a power
        # loss the target is the old directory or the whole new one, never empty files.
        for root, _, files in os.walk(tmp):
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    _fsync(Path(root, name))
            _fsync(Path(root))
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
