"""Delete a share of a kept store's imported rows and serve again: p50, p99 and recall@10 before
and after, each from a new serving process (``scale.py``'s ``after`` serve, recall against an
exact scan of the rows live then), with the deletes' own times, as ``scale.py``'s update rows.

It deletes in ``scale.py``'s order (the same seed, 50,000 ids a call), skipping the rows already
deleted, so that it also finishes a ``scale.py`` run that stopped in its deletes: the rows that
run added (``added.npy``, never deleted) stay in the exact answers.

    python benchmarks/delete_share.py --reuse DIR [--share 0.25] [--lock-vectors]
"""

from __future__ import annotations

import argparse
import pickle
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clipsearch
from _common import pct, print_table
from scale import exact_top, recall, serve

BATCH = 50_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", required=True, help="the folder `scale.py --keep` left")
    ap.add_argument("--share", type=float, default=0.25, help="of the imported rows, deleted in all")
    ap.add_argument("--lock-vectors", action="store_true", help="serve with CLIPSEARCH_LOCK_VECTORS=1")
    args = ap.parse_args()
    work = Path(args.reuse)
    db, qpath = work / "scale.db", work / "queries.npy"
    vectors = np.load(work / "vectors.npy", mmap_mode="r")
    n = len(vectors)
    added = np.load(work / "added.npy", mmap_mode="r") if (work / "added.npy").exists() else None
    queries = np.load(qpath)
    with (work / "filters.pkl").open("rb") as f:
        kinds = np.array(pickle.load(f)["kinds"])
    lock = {"CLIPSEARCH_LOCK_VECTORS": "1"} if args.lock_vectors else {}

    def deleted() -> np.ndarray:
        """The imported rows deleted so far (row i is id i{i}, seq i + 1)."""
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            seqs = np.fromiter((r[0] for r in conn.execute("SELECT seq FROM deleted")), dtype=np.int64)
        finally:
            conn.close()
        if (seqs > n).any():
            raise SystemExit("rows past the import were deleted: the exact answers would not know which")
        return seqs - 1

    def measure(label: str) -> list[str]:
        gone = deleted()
        s = serve(db, qpath, [], "after", lock)
        truth = exact_top(vectors, queries, np.setdiff1d(np.arange(n), gone), extra=added)
        row = [
            label,
            f"{n - len(gone) + (len(added) if added is not None else 0):,}",
            f"{pct(s['times'], 50) * 1000:.1f}",
            f"{pct(s['times'], 99) * 1000:.1f}",
            ", ".join(
                f"{kind} {recall([s['ids'][i] for i in sel], [truth[i] for i in sel]):.3f}"
                for kind in sorted(set(kinds))
                for sel in [np.flatnonzero(kinds == kind)]
            ),
        ]
        print(" | ".join(row), flush=True)
        return row

    rows = [measure("before")]
    order = np.random.default_rng(5).permutation(n)  # scale.py's
    gone = order[: int(args.share * n)]
    todo = gone[~np.isin(gone, deleted())]
    c = clipsearch.open(db, create=False)
    t = time.perf_counter()
    for start in range(0, len(todo), BATCH):
        c.delete([f"i{i}" for i in todo[start : start + BATCH]])
    took = time.perf_counter() - t
    c.search(vector=queries[0], limit=10)
    answered = time.perf_counter() - t
    c.store.wait_for_saves()  # the serving process after reads the index as it is now
    written = time.perf_counter() - t
    c.close()
    rows.append(measure(f"after deleting {len(todo):,} more ({args.share:.0%} of the import in all)"))
    print_table(
        f"Deleting {len(todo):,} in calls of {BATCH:,}: {took:.0f} s, the first answer after {answered:.0f} s, "
        f"the index file written after {written:.0f} s",
        ["serving process", "live rows", "p50 (ms)", "p99 (ms)", "recall@10"],
        rows,
    )


if __name__ == "__main__":
    main()
