"""What a deletion costs the next search: delete + re-query at 100k and 1M vectors, before (every
deletion or replacement rebuilt the FAISS index from all rows) and after (removed rows leave the
index through its ID map: an exact index drops them, HNSW skips them as tombstones until
`clipsearch index build` compacts it).

Each side runs in its own process on its own SQLite store: ``--baseline`` is a git revision
checked out into a temporary worktree (run on the same virtual environment), "after" is this
tree. Each writes the same synthetic vectors (those of ``benchmarks/query.py``: 512-d, CLIP-like
clusters), builds its index (HNSW above 50k vectors), then per round deletes 100 random items
and replaces 100 others (new vectors, as a re-embedded file), and times the first search after
that (which brings the index up to date), then 50 more searches, and recall@10 of those against
an exact scan over what the table holds. After the rounds, "after" also times the compaction.

    python benchmarks/deletes.py [--sizes 100000,1000000] [--rounds 3] [--baseline c533ce2]

At 1M vectors each HNSW build takes about 6 minutes on 2 cores; "before" rebuilds once per round.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import pct, print_table, source_trees

CHANGED = 100  # items deleted, and items replaced, per round
QUERIES = 50


def child(size: int, rounds: int, folder: Path) -> dict:
    """One side's measurements, run with that side's ``clipsearch`` on the path."""
    from clipsearch.encoders import ModelIdentity
    from clipsearch.store import NewItem, open_store
    from query import synthetic

    images, queries = synthetic(size, QUERIES + 1)
    store = open_store(folder / "d.db")
    store.bind_namespace("default", ModelIdentity(backend="synthetic", model="bench", pretrained="", dim=512), {})
    for start in range(0, size, 20_000):
        chunk = images[start : start + 20_000]
        store.write_batch("default", [NewItem(f"img{start + i:07d}", {}) for i in range(len(chunk))], chunk)
    started = time.perf_counter()
    kind = store.build_index("default").kind
    result: dict = {"kind": kind, "build_s": time.perf_counter() - started, "rounds": []}
    current = {f"img{i:07d}": i for i in range(size)}  # id -> row of `vectors`
    vectors = images
    rng = np.random.default_rng(1)
    for _ in range(rounds):
        ids = list(current)
        picked = [ids[j] for j in rng.choice(len(ids), 2 * CHANGED, replace=False)]
        gone, replaced = picked[:CHANGED], picked[CHANGED:]
        new = rng.standard_normal((CHANGED, 512)).astype(np.float32)
        new /= np.linalg.norm(new, axis=1, keepdims=True)
        started = time.perf_counter()
        store.delete_items("default", gone)
        store.write_batch("default", [NewItem(i, {}) for i in replaced], new)
        written = time.perf_counter() - started
        store.search("default", queries[:1], 10)
        first = time.perf_counter() - started
        for i in gone:
            del current[i]
        for j, i in enumerate(replaced):
            current[i] = len(vectors) + j
        vectors = np.concatenate([vectors, new])
        latencies, got = [], []
        for q in queries[1:]:
            t = time.perf_counter()
            got.append({h.item.id for h in store.search("default", q[None, :], 10)[0]})
            latencies.append(time.perf_counter() - t)
        live_ids = np.array(list(current))
        scores = queries[1:] @ vectors[np.array([current[i] for i in live_ids])].T
        truth = live_ids[np.argpartition(-scores, 10, axis=1)[:, :10]]
        found = sum(len(g & set(t.tolist())) for g, t in zip(got, truth, strict=True))
        p50_ms, recall = pct(latencies, 50) * 1000, found / (10 * QUERIES)
        result["rounds"].append({"write_s": written, "first_s": first, "p50_ms": p50_ms, "recall": recall})
    status = store.index_status("default")
    result["tombstones"] = getattr(status, "tombstones", 0)
    if result["tombstones"]:
        started = time.perf_counter()
        store.build_index("default")
        result["compact_s"] = time.perf_counter() - started
    store.close()
    return result


def run_side(src: Path, size: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{Path(__file__).resolve().parent}"}
        cmd = [sys.executable, __file__, "--child", str(size), "--rounds", str(rounds), "--folder", work]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", default="c533ce2", help="git revision measured as 'before' ('' to skip)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rounds, args.folder)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as work, source_trees(args.baseline, Path(work)) as trees:
        for size in (int(s) for s in args.sizes.split(",")):
            for side, src in trees.items():
                r = run_side(src, size, args.rounds)
                rounds = r["rounds"]
                print(f"{side} {size:,}: {json.dumps(r)}", flush=True)
                rows.append(
                    [
                        f"{size:,}",
                        side,
                        r["kind"],
                        f"{r['build_s']:.1f}",
                        f"{np.median([x['write_s'] for x in rounds]):.2f}",
                        f"{np.median([x['first_s'] for x in rounds]):.2f}",
                        f"{np.median([x['p50_ms'] for x in rounds]):.2f}",
                        f"{min(x['recall'] for x in rounds):.3f}",
                        str(r["tombstones"]),
                        f"{r['compact_s']:.1f}" if "compact_s" in r else "",
                    ]
                )
    print_table(
        f"delete {CHANGED} + replace {CHANGED} items, then search: median of {args.rounds} rounds, "
        f"{os.cpu_count()} CPUs",
        ["vectors", "code", "index", "build s", "write s", "write + 1st search s", "search p50 ms", "recall@10",
         "tombstones", "compact s"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
