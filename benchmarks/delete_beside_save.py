"""Deletes alone, and beside the writing of the index file: on a store that ``scale.py --keep``
(or ``--import-only`` and ``clipsearch index build``) left.

    python benchmarks/delete_beside_save.py --reuse DIR [--rounds 2] [--ids 100000]

One process opens the store and answers a query (the index caught up), then, in turn, deletes
``--ids`` random items (50,000 a call) with the database just dropped from the page cache, either
alone or while the store writes the index file in the background (``SQLiteStore._save_later``,
what the answer after a large add or delete starts), and times the first answer after each.
Each delete waits first for the index file that the answer before it began writing (its
catch-up changed more than 1% of the index). Run with ``PYTHONPATH`` at another tree's ``src``
to measure that tree's store the same way.
The ids are live ones, as a delete is given: the next ones not yet deleted in a fixed random
order of the stored items (rows 1..N of the store are ids i0..i(N-1)), so that runs one after
another on one store (another tree's with ``PYTHONPATH``) each delete ids that are there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clipsearch
from _common import drop_from_page_cache, live_in_order, print_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", required=True, help="the folder `scale.py --keep` left")
    ap.add_argument("--rounds", type=int, default=2, help="alone, then beside the write, this many times")
    ap.add_argument("--ids", type=int, default=100_000, help="items each delete removes")
    args = ap.parse_args()
    work = Path(args.reuse)
    db = work / "scale.db"
    queries = np.load(work / "queries.npy").astype(np.float32)
    c = clipsearch.open(db, create=False)
    c.search(vector=queries[0], limit=10)
    store = c.store
    index = store._indexes[(c.namespace, "image")]
    path = store._index_path(c.namespace, "image")
    live = c.info().items
    pool = live_in_order(store._conn, 11)
    at, rows = 0, []
    for _ in range(args.rounds):
        for beside in (False, True):
            store.wait_for_saves()  # the file the last first answer began writing (one at a time)
            drop_from_page_cache(db)
            if beside:
                store._save_later(index, path)
                time.sleep(0.2)  # the write under way
            t = time.perf_counter()
            for start in range(at, at + args.ids, 50_000):
                ids = [f"i{i}" for i in pool[start : min(start + 50_000, at + args.ids)]]
                if c.delete(ids) != len(ids):
                    raise SystemExit("a delete of live ids found fewer of them")
            at += args.ids
            deleted = time.perf_counter() - t
            c.search(vector=queries[0], limit=10)
            answered = time.perf_counter() - t
            rows.append(["beside the index write" if beside else "alone", f"{deleted:.1f} s", f"{answered:.1f} s"])
    c.close()
    print_table(
        f"Delete {args.ids:,} random live items ({live:,} live), database out of the page cache first",
        ["delete", "deleted in", "first answer after"],
        rows,
    )


if __name__ == "__main__":
    main()
