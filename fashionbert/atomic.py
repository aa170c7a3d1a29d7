"""Replacing a directory so that readers see the old one or the new one, never neither."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
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
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
