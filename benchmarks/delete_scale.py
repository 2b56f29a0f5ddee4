"""Deletes at catalog scale, on a store that ``benchmarks/scale.py --keep`` left: how long
deleting a share of the items takes and the first answer after it, beside an earlier revision,
and what the deleted rows cost the searches after them.

    python benchmarks/scale.py --n 10000000 --queries 200 --keep --skip-updates   # once (an hour)
    python benchmarks/delete_scale.py --reuse DIR [--baseline REV] [--share 0.01] [--upto 0.25] [--cold] [--rounds 1]

In order, on the same store: ``--baseline`` (a git revision checked out into a temporary worktree
and run on this virtual environment; the file's schema version is set back for it where this
tree's migration changed nothing it reads) deletes ``--share`` of the items and answers one
query; this tree measures p50 and recall@10 of the queries against an exact scan of the rows
left, deletes another ``--share`` of them and answers one query (``--rounds``: the two sides
take turns that many times), deletes more until ``--upto`` of the items are gone, and measures
p50 and recall@10 again. Each side deletes its own random items (disjoint), 50,000 a call, as
``scale.py`` does; ``--cold`` drops the database's pages from the page cache before each timed
delete.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import open_as, pct, print_table, source_trees
from scale import exact_top

HERE = Path(__file__).resolve().parent

DELETE = r"""
import json, os, sys, time
import numpy as np
import clipsearch
db, rows, query = sys.argv[1], np.load(sys.argv[2]), np.load(sys.argv[3])
c = clipsearch.open(db, create=False)
c.search(vector=query, limit=10)  # the index loaded and fresh: what is timed is the delete
if sys.argv[4] == "cold":  # the database's pages out of the page cache, as after a day of other work
    os.sync()
    for path in (db, db + "-wal"):
        if os.path.exists(path):
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
t = time.perf_counter()
gone = 0
for start in range(0, len(rows), 50_000):
    gone += c.delete([f"i{i}" for i in rows[start : start + 50_000]])
deleted = time.perf_counter() - t
c.search(vector=query, limit=10)
print(json.dumps({"deleted": deleted, "answered": time.perf_counter() - t, "gone": gone}))
"""


def delete_with(src: Path, db: Path, rows: np.ndarray, query: np.ndarray, work: Path, cold: bool) -> dict:
    """Delete ``rows`` with the clipsearch of source tree ``src``, in a process of its own
    (``cold``: the database's pages dropped from the page cache first)."""
    np.save(work / "rows.npy", rows)
    np.save(work / "query.npy", query)
    cmd = [sys.executable, "-c", DELETE, str(db), str(work / "rows.npy"), str(work / "query.npy")]
    cmd.append("cold" if cold else "warm")
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr)
    return json.loads(done.stdout)


def measure(db: Path, vectors: np.ndarray, queries: np.ndarray, live: np.ndarray) -> tuple[float, float, float, Any]:
    """p50 and p99 (ms) of one client's queries (the index loaded first), their recall@10 against
    an exact scan of the ``live`` rows, and the index's status."""
    import clipsearch

    truth = exact_top(vectors, queries, np.flatnonzero(live))
    c = clipsearch.open(db, create=False)
    c.search(vector=queries[0], limit=10)
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        hits = c.search(vector=q, limit=10)
        times.append(time.perf_counter() - t)
        found.append({int(h.id[1:]) for h in hits})
    got = np.mean([len(f & t) / 10 for f, t in zip(found, truth, strict=True)])
    status = c.info().index
    c.close()
    return pct(times, 50) * 1000, pct(times, 99) * 1000, float(got), status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", required=True, help="the folder `scale.py --keep` left")
    ap.add_argument("--baseline", default="", help="a git revision to delete with first, beside this tree")
    ap.add_argument("--share", type=float, default=0.01, help="the share of the items each side deletes")
    ap.add_argument("--upto", type=float, default=0.25, help="then this tree deletes until this share is gone")
    ap.add_argument("--seed", type=int, default=6)
    ap.add_argument(
        "--since", type=float, default=0.0,
        help="the store already lost the first SINCE of the items an earlier run (same seed) deleted: go on from there",
    )  # fmt: skip
    ap.add_argument(
        "--cold", action="store_true",
        help="drop the database's pages from the page cache before each timed delete (posix_fadvise), so "
        "that no side reads pages another one left",
    )  # fmt: skip
    ap.add_argument("--rounds", type=int, default=1, help="deletes of --share by each side in turn")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent / "src"))
    work = Path(args.reuse)
    db, vectors = work / "scale.db", np.load(work / "vectors.npy", mmap_mode="r")
    queries = np.load(work / "queries.npy").astype(np.float32)
    n = len(vectors)
    order = np.random.default_rng(args.seed).permutation(n)
    step = int(args.share * n)
    live = np.ones(n, dtype=bool)
    live[order[: int(args.since * n)]] = False
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp, source_trees(args.baseline, Path(tmp)) as trees:
        taken = int(args.since * n)
        # before, after, before, after...: each side deletes in turn, so that whatever else the
        # machine does falls on both alike
        for turn, (side, src) in enumerate(list(trees.items()) * args.rounds):
            gone = np.sort(order[taken : taken + step])
            taken += step
            if side == "after" and turn < len(trees):
                p50, p99, got, _ = measure(db, vectors, queries, live)
                rows.append([f"after: before its deletes ({int(live.sum()):,} items left)", "", "",
                             f"{p50:.1f} / {p99:.1f}", f"{got:.3f}"])  # fmt: skip
            if side == "before":
                open_as(src, db)  # the baseline opens a file this tree may have migrated
            r = delete_with(src, db, gone, queries[0], Path(tmp), args.cold)
            live[gone] = False
            rows.append([f"{side}: delete {r['gone']:,}", f"{r['deleted']:.1f} s", f"{r['answered']:.1f} s", "", ""])
        more = np.sort(order[taken : int(args.upto * n)])
        r = delete_with(trees["after"], db, more, queries[0], Path(tmp), args.cold)
        live[more] = False
        p50, p99, got, status = measure(db, vectors, queries, live)
        label = f"after: delete {r['gone']:,} more ({int((~live).sum()) / n:.0%} of the items in all)"
        rows.append([label, f"{r['deleted']:.1f} s", f"{r['answered']:.1f} s", f"{p50:.1f} / {p99:.1f}", f"{got:.3f}"])
    print_table(
        f"Deletes on {n:,} x {vectors.shape[1]} ({status.kind} index, {status.unpurged:,} deleted rows unpurged)",
        ["step", "deleted in", "first answer after", "p50 / p99 (ms)", "recall@10"],
        rows,
    )


if __name__ == "__main__":
    main()
