"""Filtered search on an HNSW index: hits returned and recall@10 against an exact scan of the
rows the filter allows, at several selectivities, for this checkout and a baseline revision.

The vectors are `query.py`'s synthetic set (image vectors around one cone, text queries around
another, clustered by topic); a `client` column puts 10%, 1% and 0.1% of the rows, at random,
into `Mid`, `Small` and `Tiny`. One store is built (by the baseline's code when given, so that the
same HNSW graph serves both), then each tree opens it in a process of its own and runs the same
filtered queries, one at a time: `store.search(namespace, query, 10, filters={"client": VALUE})`.
"first query" is the first with each filter (it finds the allowed rows: a JSON scan of the
table); p50 is over all of them.

    python benchmarks/filtered.py [--n 100000] [--queries 50] [--baseline REV]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, source_trees
from query import synthetic

SHARES = {"Mid": 0.10, "Small": 0.01, "Tiny": 0.001}

BUILD = """
import numpy as np, sys
from clipsearch.encoders import ModelIdentity
from clipsearch.store import NewItem, SQLiteStore
images = np.load(sys.argv[2]); clients = open(sys.argv[3]).read().split()
store = SQLiteStore(sys.argv[1])
store.bind_namespace("default", ModelIdentity("open_clip", "synthetic", "", images.shape[1], {}), {})
for start in range(0, len(images), 10_000):
    rows = range(start, min(start + 10_000, len(images)))
    items = [NewItem(f"i{i}", {"client": clients[i]}, f"h{i}") for i in rows]
    store.write_batch("default", items, images[start : rows.stop])
print(store.build_index("default").kind)
store.close()
"""

MEASURE = """
import json, sys, time
import numpy as np
from clipsearch.store import SQLiteStore
queries = np.load(sys.argv[2]); store = SQLiteStore(sys.argv[1]); out = {}
store.search("default", queries[:1], 10)  # opens the index
for value in sys.argv[3].split(","):
    times, ids = [], []
    for q in queries:
        started = time.perf_counter()
        hits = store.search("default", q[None, :], 10, {"client": value})[0]
        times.append(time.perf_counter() - started)
        ids.append([int(h.item.id[1:]) for h in hits])
    out[value] = {"ids": ids, "p50_ms": 1000 * float(np.median(times)), "first_ms": 1000 * times[0]}
print(json.dumps(out))
store.close()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--baseline", default="", help="a git revision to compare with")
    args = ap.parse_args()
    images, queries = synthetic(args.n, args.queries)
    rng = np.random.default_rng(1)
    draw = rng.random(args.n)
    clients = np.full(args.n, "Big", dtype=object)
    edge = 0.0
    for value, share in SHARES.items():
        clients[(draw >= edge) & (draw < edge + share)] = value
        edge += share
    rows = []
    with tempfile.TemporaryDirectory() as tmp, source_trees(args.baseline, Path(tmp)) as trees:
        work = Path(tmp)
        np.save(work / "images.npy", images)
        np.save(work / "queries.npy", queries)
        (work / "clients.txt").write_text("\n".join(clients))
        db = work / "store.db"
        builder = trees.get("before", trees["after"])
        env = {**os.environ, "PYTHONPATH": str(builder)}
        cmd = [sys.executable, "-c", BUILD, str(db), str(work / "images.npy"), str(work / "clients.txt")]
        kind = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip()
        for label, src in trees.items():
            env = {**os.environ, "PYTHONPATH": str(src)}
            cmd = [sys.executable, "-c", MEASURE, str(db), str(work / "queries.npy"), ",".join(SHARES)]
            found = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
            for value, share in SHARES.items():
                allowed = np.flatnonzero(clients == value)
                exact = np.argsort(-(queries @ images[allowed].T), axis=1)[:, :10]
                truth = [set(allowed[row].tolist()) for row in exact]
                got = found[value]["ids"]
                recall = np.mean([len(set(g) & t) / len(t) for g, t in zip(got, truth, strict=True)])
                short = sum(len(g) < min(10, len(allowed)) for g in got)
                rows.append([label, f"{share:.1%} ({len(allowed)})", f"{recall:.3f}", f"{short} of {len(got)}",
                             f"{found[value]['first_ms']:.1f}", f"{found[value]['p50_ms']:.2f}"])  # fmt: skip
    title = (
        f"Filtered search, {args.n} x {images.shape[1]} synthetic vectors, index {kind}, k=10, {os.cpu_count()} cores"
    )
    columns = ["tree", "filter selects", "recall@10", "queries short of 10", "first query (ms)", "p50 (ms)"]
    print_table(title, columns, rows)


if __name__ == "__main__":
    main()
