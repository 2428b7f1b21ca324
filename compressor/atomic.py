"""Atomic file writes: a temporary sibling in the same directory, then `os.replace`.

A reader (a rerun's skip check, a serving worker, a report) never sees a half-written file, and a
crash leaves the old file or none. The same directory matters: `os.replace` is atomic only within
one file system. Torch-free, so serving and the benchmarks use it too.
"""

from __future__ import annotations

import json
import os
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
