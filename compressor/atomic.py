"""Atomic writes of files and directories: a temporary sibling in the same directory, then a rename.

A reader (a rerun's skip check, a serving worker, a report) never sees a half-written file or
directory, and a crash leaves the old one or none. The same directory matters: a rename is atomic
only within one file system. Standard library only, so serving and the benchmarks use it too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for writers that take a file name (`torch.save`, `np.save`,
    `savefig`); moved over `path` when the block succeeds, removed when it raises.

    The temporary name ends with `path`'s suffix because some writers pick the format from it
    (`np.save` appends `.npy` otherwise, `savefig` reads `.png`); the process id keeps two
    processes writing the same file from sharing a temporary one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically; returns `path`."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, payload, indent: int | None = 2, default=str) -> Path:
    """`payload` as JSON (objects JSON cannot hold go through `default`, `str` unless told),
    written atomically."""
    return atomic_write(path, json.dumps(payload, indent=indent, default=default))


@contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside `out`; on success it replaces `out`, on any error it is removed.

    A reader never sees a half-written `out`: it is the old directory or the new one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
