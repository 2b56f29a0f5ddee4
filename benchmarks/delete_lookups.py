"""A large delete's id lookups, from the id map and from the database, side by side: on a store
that ``scale.py --keep`` (or ``--import-only`` and ``clipsearch index build``, which writes the
map) left.

    python benchmarks/delete_lookups.py --reuse DIR [--rounds 3] [--ids 50000]

Each round draws ``--ids`` random ids of the live items (what a delete is given: ids that are
there; the store's rows numbered 1..N are ids i0..i(N-1)) and finds their row numbers in
turn by the two paths a delete has, each with the store's files dropped from the page cache
first: the database's id index on 8 connections at once (``SQLiteStore._lookup_apart``, what a
delete without a map does) and the id map (``_lookup_large``: the map read whole, the removal
log since the map's mark checked, the ids it cannot answer looked up in the database). Nothing
is deleted; both must find the same rows. The order of the two paths alternates by round.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import drop_from_page_cache, print_table
from clipsearch.store import SQLiteStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", required=True, help="the folder `scale.py --keep` left")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ids", type=int, default=50_000, help="ids a round looks up (a delete call's worth)")
    args = ap.parse_args()
    db = Path(args.reuse) / "scale.db"
    store = SQLiteStore(db)
    ns = store._require("default")
    n = store._conn.execute("SELECT max(seq) FROM items").fetchone()[0]
    live = store.namespace("default").items
    gone = np.fromiter((r[0] for r in store._conn.execute("SELECT seq FROM deleted")), dtype=np.int64)
    alive = np.setdiff1d(np.arange(1, n + 1), gone)
    rng = np.random.default_rng(17)
    rows = []
    for r in range(args.rounds):
        ids = sorted({f"i{i - 1}" for i in rng.choice(alive, args.ids, replace=False)})
        times, found = {}, {}
        paths = [("database, 8 connections", False), ("id map", True)]
        for name, mapped in paths if r % 2 == 0 else paths[::-1]:
            drop_from_page_cache(db)
            store._map_removed.clear()  # as a new process: the removal log since the map read too
            with store._tx() as conn:  # inside a write transaction, as a delete does
                t = time.perf_counter()
                seqs = store._lookup_large(conn, ns, ids) if mapped else store._lookup_apart("default", ids)
                times[name] = time.perf_counter() - t
            found[name] = sorted(seqs)
        if len({tuple(v) for v in found.values()}) != 1:
            raise SystemExit("the two paths found different rows")
        rows.append([r + 1, f"{len(found['id map']):,}", *(f"{times[name]:.2f} s" for name, _ in paths)])
    store.close()
    print_table(
        f"Look up {args.ids:,} random ids ({live:,} live of {n:,}), cold page cache",
        ["round", "found", "database, 8 connections", "id map"],
        rows,
    )


if __name__ == "__main__":
    main()
