"""IVF-PQ's re-ranking effort against recall, in one warm serving process: the same queries with
each number of candidates re-scored from the fp16 file, in turn, several rounds (the order of
the settings fixed, each set of rows read once before the rounds: a new process per setting, as
``scale.py --rerank`` runs, measures whichever rows the page cache still holds as well).

On a store that ``scale.py --keep`` (or ``--import-only`` and ``clipsearch index build``) left,
whose rows are all live (recall is against the import's exact answers).

    python benchmarks/rerank.py --reuse DIR [--rerank 0,1024,1536] [--rounds 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clipsearch
from _common import pct, print_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", required=True, help="the folder `scale.py --keep` left")
    ap.add_argument("--rerank", default="0,1024,1536", help="candidates re-scored (0: the default for the size)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.reuse)
    queries = np.load(work / "queries.npy").astype(np.float32)
    with (work / "filters.pkl").open("rb") as f:
        kinds = np.array(pickle.load(f)["kinds"])
    with (work / "truth.pkl").open("rb") as f:
        truth = pickle.load(f)[""]
    c = clipsearch.open(work / "scale.db", create=False)
    imported = len(np.load(work / "vectors.npy", mmap_mode="r"))
    if c.info().items != imported or c.info().index.kind != "ivfpq":
        raise SystemExit("needs an IVF-PQ store with every imported row live")
    c.search(vector=queries[0], limit=10)
    index = c.store._indexes[(c.namespace, "image")]
    base = index.settings
    settings = [int(v) for v in args.rerank.split(",")]

    def run(rerank: int) -> tuple[list[list[int]], list[float]]:
        index.settings = dataclasses.replace(base, rerank=rerank)
        ids, times = [], []
        for q in queries:
            started = time.perf_counter()
            hits = c.search(vector=q, limit=10)
            times.append(time.perf_counter() - started)
            ids.append([int(h.id[1:]) for h in hits])
        return ids, times

    for rerank in settings:
        run(rerank)  # each setting's rows read once
    rows = []
    for r in range(args.rounds):
        for rerank in settings:
            ids, times = run(rerank)  # (index.rerank: what that setting gives)
            for kind in sorted(set(kinds)):
                sel = np.flatnonzero(kinds == kind)
                found = np.mean([len(set(ids[i]) & set(truth[i])) / min(10, len(truth[i])) for i in sel])
                rows.append(
                    [
                        r + 1,
                        f"{index.rerank:,}" + (" (default)" if not rerank else ""),
                        kind,
                        f"{pct([times[i] for i in sel], 50) * 1000:.1f}",
                        f"{pct([times[i] for i in sel], 99) * 1000:.1f}",
                        f"{found:.3f}",
                    ]
                )
    c.close()
    print_table(
        f"Re-ranked candidates, one warm process, {len(queries)} queries",
        ["round", "re-ranked", "queries", "p50 (ms)", "p99 (ms)", "recall@10"],
        rows,
    )


if __name__ == "__main__":
    main()
