"""Unfiltered search on a store `scale.py --keep` left after its updates, beside another revision.

`scale.py`'s updates add 10% more vectors and delete 1%, then 25% of the original rows, so its
kept store no longer matches the exact answers it saved (`--reuse` measures the original rows).
This serves the same queries on the store as the updates left it, with the exact top 10 among
its live rows (the original rows less the deleted, plus the added: recomputed once and kept as
`truth_after.pkl`), in a new process per revision: this tree and, with ``--baseline``, a git
revision checked out beside it, in the order given by ``--order`` (default: before, after,
after, before, so that neither side always finds the page cache the other warmed).

    python benchmarks/scale_after.py DIR [--baseline REV] [--order before,after,after,before]
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import open_as, pct, print_table, source_trees
from scale import exact_top, recall, serve


def live_truth(work: Path, queries: np.ndarray, deleted: float) -> list[set[int]]:
    """The exact top 10 among the rows the updates left (scale.py's deletes: the first
    ``deleted`` share of the same permutation), computed once."""
    kept = work / "truth_after.pkl"
    if kept.exists():
        with kept.open("rb") as f:
            return pickle.load(f)
    vectors = np.load(work / "vectors.npy", mmap_mode="r")
    added = np.load(work / "added.npy", mmap_mode="r")
    n = len(vectors)
    gone = np.random.default_rng(5).permutation(n)[: int(deleted * n)]
    truth = exact_top(vectors, queries, np.setdiff1d(np.arange(n), gone), extra=added)
    with kept.open("wb") as f:
        pickle.dump(truth, f)
    return truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", help="the folder `scale.py --keep` left, after its updates")
    ap.add_argument("--baseline", default="", help="a git revision to serve beside this tree")
    ap.add_argument("--order", default="before,after,after,before", help="the sides, in the order they run")
    ap.add_argument("--deleted", type=float, default=0.25, help="the share scale.py's last delete reached")
    args = ap.parse_args()
    work = Path(args.work)
    if not (work / "added.npy").exists():
        sys.exit(f"{work} has no added.npy: run scale.py --keep with its updates first")
    queries = np.load(work / "queries.npy")
    with (work / "filters.pkl").open("rb") as f:
        kinds = np.array(pickle.load(f)["kinds"])
    truth = live_truth(work, queries, args.deleted)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, source_trees(args.baseline, Path(tmp)) as trees:
        for side in args.order.split(","):
            if side not in trees:
                continue
            open_as(trees[side], work / "scale.db")  # an older side reads a store this tree migrated
            # scale.py's serving process (one client, no filters), on this side's library
            out = serve(work / "scale.db", work / "queries.npy", [], "after", {"PYTHONPATH": str(trees[side])})
            for kind in sorted(set(kinds)):
                sel = np.flatnonzero(kinds == kind)
                times = [out["times"][i] for i in sel]
                got = recall([out["ids"][i] for i in sel], [truth[i] for i in sel])
                label = f"{side} ({args.baseline})" if side == "before" else side
                rows.append([label, kind, f"{pct(times, 50) * 1000:.1f}", f"{pct(times, 99) * 1000:.1f}", f"{got:.3f}"])
    print_table(
        "Unfiltered search on the store after the updates, one client, each query once",
        ["tree", "queries", "p50 (ms)", "p99 (ms)", "recall@10"],
        rows,
    )


if __name__ == "__main__":
    main()
