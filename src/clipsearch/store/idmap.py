"""The id map: a namespace's item ids as 128-bit hashes, sorted, beside their seqs, in one file
in the index folder (``<namespace>.ids``), written by `index build`.

A large delete finds its rows here: at 10M rows, 100,000 random ids touch ~54,000 pages of the
database's id index, one random read each (1.1-3.4 s on 8 connections at once, by the day's
disk), where this file (24 bytes an id, 240 MB) is read from start to end in ~0.2 s.
The map holds what was live at one point of the removals log (its ``mark``): a row removed since
(deleted, or re-embedded under a new seq) is in the log after that mark, and the store looks
such ids up in the database again, as it does ids the map does not hold (written since).
A hash is BLAKE2b's 128 bits: two ids sharing one (about 1 in 10^22 at 10M ids) are left out
when the map is written, and so looked up in the database.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..index import remove_orphans, sync_folder, write_file

MAGIC = "clipsearch-idmap"
VERSION = 1
_HEADER = 4096  # the JSON header's room; the three arrays follow, 8-byte aligned
_READ = 8 << 20  # bytes a read of the map asks for


def hash_ids(ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The 128-bit hash of each id, as its high and low 64 bits. An id with a lone surrogate (a
    file name that was not UTF-8) hashes too: it cannot be stored, so it matches nothing."""
    raw = b"".join(hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=16).digest() for i in ids)
    pairs = np.frombuffer(raw, dtype="<u8").reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


@dataclass(frozen=True)
class IdMap:
    path: Path
    owner: str  # the namespace's, as its index files name it (IndexState.owner)
    mark: int  # the last entry of the removals log the map reflects
    count: int
    token: str  # this writing of the file: what a cache of the removals since `mark` is keyed by

    @classmethod
    def write(cls, path: Path, owner: str, mark: int, seqs: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> IdMap:
        """Write the map of the ids hashed to ``hi``, ``lo`` (``hash_ids``), each live at the seq
        beside it at ``mark``, replacing the file at ``path`` in one rename (``write_file``)."""
        order = np.lexsort((lo, hi))
        hi, lo, seqs = hi[order], lo[order], np.asarray(seqs, dtype=np.int64)[order]
        if len(hi) > 1:
            same = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
            if same.any():
                shared = np.zeros(len(hi), dtype=bool)
                shared[1:] |= same
                shared[:-1] |= same
                hi, lo, seqs = hi[~shared], lo[~shared], seqs[~shared]
        token = uuid.uuid4().hex[:12]
        header = {"magic": MAGIC, "version": VERSION, "owner": owner, "mark": mark, "count": len(hi), "token": token}
        blob = json.dumps(header).encode()
        if len(blob) >= _HEADER:
            raise ValueError(f"id map header too long ({len(blob)} bytes)")

        def fill(out: Any) -> None:
            out.write(blob.ljust(_HEADER, b"\n"))
            for array in (hi, lo, seqs):
                out.write(np.ascontiguousarray(array, dtype="<i8" if array is seqs else "<u8"))

        if write_file(path, fill):
            sync_folder(path.parent)
        remove_orphans(path)
        return cls(path, owner, mark, len(hi), token)

    @classmethod
    def open(cls, path: Path, owner: str) -> IdMap | None:
        """The map at ``path``, where there is one of this owner's that reads whole (None otherwise)."""
        try:
            with open(path, "rb") as f:
                header = json.loads(f.read(_HEADER))
                size = os.fstat(f.fileno()).st_size
        except (OSError, ValueError):
            return None
        if not isinstance(header, dict) or header.get("magic") != MAGIC or header.get("version") != VERSION:
            return None
        try:
            mark, count, token = int(header["mark"]), int(header["count"]), str(header["token"])
        except (KeyError, TypeError, ValueError):
            return None
        if header.get("owner") != owner or size != _HEADER + 24 * count:
            return None  # another namespace's (or database's), or cut short
        return cls(path, owner, mark, count, token)

    def find(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """For each of ``ids``, whether the map holds it, and its seq there (-1 where not): the
        whole file is read (one sequential read) and searched in memory."""
        qhi, qlo = hash_ids(ids)
        order = np.argsort(qhi)  # searched in order: each step near the last one's memory
        qhi, qlo = qhi[order], qlo[order]
        n = self.count
        hi, lo = np.empty(n, dtype="<u8"), np.empty(n, dtype="<u8")
        seqs = np.empty(n, dtype="<i8")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(_HEADER)
            for array in (hi, lo, seqs):
                view = memoryview(array).cast("B")
                while view:
                    # large reads: this disk served 270 MB/s to NumPy's fromfile (small buffered
                    # reads, one readahead window at a time) and 1.6-2 GB/s to reads of 8 MB
                    got = f.readinto(view[:_READ])
                    if not got:
                        raise OSError(f"{self.path} ends early")
                    view = view[got:]
        left = np.searchsorted(hi, qhi, side="left")
        right = np.searchsorted(hi, qhi, side="right")
        found = np.zeros(len(qhi), dtype=bool)
        out = np.full(len(qhi), -1, dtype=np.int64)
        one = right - left == 1  # nearly always: 64 bits seldom repeat among 10M ids
        at = left[one]
        match = lo[at] == qlo[one]
        found[np.flatnonzero(one)[match]] = True
        out[np.flatnonzero(one)[match]] = seqs[at[match]]
        for i in np.flatnonzero(right - left > 1):
            rows = left[i] + np.flatnonzero(lo[left[i] : right[i]] == qlo[i])
            if len(rows):
                found[i], out[i] = True, seqs[rows[0]]
        unsorted_found, unsorted_out = np.empty_like(found), np.empty_like(out)
        unsorted_found[order], unsorted_out[order] = found, out
        return unsorted_found, unsorted_out
