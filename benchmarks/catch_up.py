"""The first answer after a large delete, in a new process: the index loaded from its file, the
ids deleted (random live ones, 50,000 a call), then one search, which catches the index up (reads
the removals log since the index's mark and drops those rows). On a store that ``scale.py
--keep`` (or ``--import-only`` and ``clipsearch index build``) left; the store is spent (its rows
deleted). Run it with ``PYTHONPATH`` at another revision's ``src`` to compare, alternating.

    python benchmarks/catch_up.py --reuse DIR [--ids 500000] [--seed 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clipsearch
from _common import live_in_order, print_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", required=True, help="the folder `scale.py --keep` left")
    ap.add_argument("--ids", type=int, default=500_000)
    ap.add_argument("--seed", type=int, default=1, help="which random live ids (a new seed for each run)")
    args = ap.parse_args()
    work = Path(args.reuse)
    query = np.load(work / "queries.npy")[0].astype(np.float32)
    c = clipsearch.open(work / "scale.db", create=False)
    c.search(vector=query, limit=10)
    pool = live_in_order(c.store._conn, args.seed)
    started = time.perf_counter()
    for at in range(0, args.ids, 50_000):
        ids = [f"i{i}" for i in pool[at : min(at + 50_000, args.ids)]]
        if c.delete(ids) != len(ids):
            raise SystemExit("a delete of live ids found fewer of them")
    deleted = time.perf_counter() - started
    started = time.perf_counter()
    c.search(vector=query, limit=10)
    answered = time.perf_counter() - started
    c.close()
    print_table(
        f"Delete {args.ids:,} random live ids, then search ({clipsearch.__file__})",
        ["deleted in", "the first answer after took"],
        [[f"{deleted:.1f} s", f"{answered:.1f} s"]],
    )


if __name__ == "__main__":
    main()
