"""An IVF-PQ store deleted past half of its fp16 file: the first answer after the deletes, searches
while the file is rewritten without the removed rows (after that answer, on the thread that
writes the index file), how long the rewrite and the write took, and the answers after it, which
must be the ones given before it (the lists and codes do not change, nor the rows kept).

On a store that ``scale.py --keep`` (or ``--import-only`` and ``clipsearch index build``) left,
whose index is IVF-PQ (10M vectors under the default memory budget). It deletes random live ids,
50,000 a call, until the file is ``--past`` more than half removed rows (the store is spent for
the other benchmarks: what they measure assumes its rows).

    python benchmarks/rewrite.py --reuse DIR [--past 0.02] [--queries 200]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clipsearch
from _common import live_in_order, pct, print_table
from clipsearch.index import MAX_FILE_WASTE, VectorFile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", required=True, help="the folder `scale.py --keep` left")
    ap.add_argument("--past", type=float, default=0.02, help="share of the file past half removed to delete to")
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    work = Path(args.reuse)
    db = work / "scale.db"
    queries = np.load(work / "queries.npy").astype(np.float32)[: args.queries]
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("clipsearch.index").addHandler(handler)
    logging.getLogger("clipsearch.index").setLevel(logging.INFO)

    c = clipsearch.open(db, create=False)
    c.search(vector=queries[0], limit=10)
    store = c.store
    index = store._indexes[(c.namespace, "image")]
    if index.state.kind != "ivfpq":
        raise SystemExit(f"the store's index is {index.state.kind}, not ivfpq")
    path = store._index_path(c.namespace, "image")
    before = index.state.file_rows, index.state.count, _size(index)
    target = int(index.state.file_rows * (1 - MAX_FILE_WASTE - args.past))
    pool = live_in_order(store._conn, 23)
    drop = max(0, index.state.count - target)

    t = time.perf_counter()
    for start in range(0, drop, 50_000):
        ids = [f"i{i}" for i in pool[start : min(start + 50_000, drop)]]
        if c.delete(ids) != len(ids):
            raise SystemExit("a delete of live ids found fewer of them")
    deleted = time.perf_counter() - t
    c.search(vector=queries[0], limit=10)
    answered = time.perf_counter() - t
    if index is not store._indexes[(c.namespace, "image")]:
        raise SystemExit("the index was rebuilt")
    rewriting = path in store._saving and index.wasteful

    during, during_ids = [], []
    for q in queries:  # while the fp16 file is rewritten (if it still is)
        s = time.perf_counter()
        during_ids.append([h.id for h in c.search(vector=q, limit=10)])
        during.append(time.perf_counter() - s)
    store.wait_for_saves()
    written = time.perf_counter() - t
    after, same = [], 0
    for q, earlier in zip(queries, during_ids, strict=True):
        s = time.perf_counter()
        got = [h.id for h in c.search(vector=q, limit=10)]
        after.append(time.perf_counter() - s)
        same += got == earlier
    now = index.state.file_rows, index.state.count, _size(index)
    c.close()
    rows = [
        [f"delete {drop:,} ({drop / before[1]:.0%} of {before[1]:,} live)", f"{deleted:.0f} s"],
        ["first answer after the deletes began", f"{answered:.1f} s (no rebuild)"],
        [
            f"{len(queries)} searches {'during the rewrite' if rewriting else 'after the answer'}",
            f"p50 {pct(during, 50) * 1000:.1f} ms, p99 {pct(during, 99) * 1000:.1f} ms",
        ],
        ["fp16 file rewritten and index file written, from the deletes' start", f"{written:.0f} s"],
        *(["the rewrite (its log)", line.split("rows: ")[-1]] for line in said if line.startswith("rewrote")),
        [f"{len(queries)} searches after", f"p50 {pct(after, 50) * 1000:.1f} ms, p99 {pct(after, 99) * 1000:.1f} ms"],
        ["answers after the rewrite the same as during it", f"{same} of {len(queries)}"],
        ["fp16 file: rows / live / size, before", f"{before[0]:,} / {before[1]:,} / {before[2] / 1e9:.2f} GB"],
        ["fp16 file: rows / live / size, after", f"{now[0]:,} / {now[1]:,} / {now[2] / 1e9:.2f} GB"],
    ]
    print_table("Deleting past half of an IVF-PQ index's fp16 file", ["measure", "value"], rows)
    if same != len(queries):
        raise SystemExit("the rewrite changed answers")


def _size(index) -> int:
    return VectorFile.paths(index.file.base, index.file.token)[0].stat().st_size


if __name__ == "__main__":
    main()
