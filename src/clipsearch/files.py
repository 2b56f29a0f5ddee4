"""Files: atomic writes (a reader sees the old file or the new one, never half of one: a cache
entry, an export's metadata, an upload, even when the writer is killed), the small JSON caches
kept in the user cache, and file digests."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes | str, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder (made if absent);
    ``mode``: the file's permissions (default: the temporary file's, owner-only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's contents (hex), read in chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class JsonCache:
    """A small JSON object in a file that only saves recomputing something (the oneDNN
    verdicts, weight digests): an unreadable file reads as empty, a write merges into what the
    file holds now (another process may have added entries) and is atomic, and a cache that
    cannot be written costs the recomputation next time, nothing else."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def update(self, entries: dict[str, Any]) -> bool:
        """Add ``entries``; False if the file could not be written."""
        data = self.read()
        data.update(entries)
        try:
            write_atomic(self.path, json.dumps(data, indent=1), mode=0o644)
        except OSError:
            return False
        return True
