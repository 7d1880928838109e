"""Files that appear complete or not at all."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that it appears complete or not at all.

    The bytes go to a hidden temp file in the same folder (so ``os.replace`` is a rename on one
    filesystem), are fsynced, then renamed over ``path``; on any error the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # 0o666 lets the umask choose the final permissions (mkstemp would leave 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (recorded so a changed file is noticed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_id(source: str) -> str:
    """How an input is recorded: an existing file or folder as its absolute path (so a rerun from
    elsewhere matches), anything else (a preset, a hub id) as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source
