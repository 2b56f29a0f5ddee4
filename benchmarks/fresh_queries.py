"""Serving latency for queries a process has not seen before, round after round, in one process:
what a server answering new queries meets, where ``scale.py`` and ``rerank.py`` measure the same
200 queries (whose re-ranked rows a second pass finds in the CPU's caches).

Each round draws new text and image queries from the set's own topics (``scale.py``'s generator:
text from the topics' cone, images at cosine ~0.99 from a stored vector); the last round asks the
first round's queries again. Beside each round's p50 and p99, the time a query spends gathering
its re-ranked rows from the fp16 file (``VectorFile.read16``: 1,019 random rows at 10M), and, as
a control, gathering as many random 1 KB rows from an anonymous 4 GB array made in this process
(the same rows' second gather in brackets): on a machine whose memory is slow to reach at
random, both are slow.

On a store that ``scale.py --keep`` (or ``--import-only`` and ``clipsearch index build``) left:

    python benchmarks/fresh_queries.py --reuse DIR [--rounds 6] [--queries 100] [--lock] [--cold]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import drop_from_page_cache, pct, print_table
from scale import Synthetic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", required=True, help="the folder `scale.py --keep` left")
    ap.add_argument("--rounds", type=int, default=6, help="rounds of new queries (then one of the first again)")
    ap.add_argument("--queries", type=int, default=100, help="queries a round, half text, half image")
    ap.add_argument("--lock", action="store_true", help="CLIPSEARCH_LOCK_VECTORS=1: the fp16 file locked first")
    ap.add_argument("--cold", action="store_true", help="drop the store's files from the page cache first")
    args = ap.parse_args()
    work = Path(args.reuse)
    db = work / "scale.db"
    if args.cold:
        drop_from_page_cache(db)
    if args.lock:
        os.environ["CLIPSEARCH_LOCK_VECTORS"] = "1"
    import clipsearch

    stored = np.load(work / "vectors.npy", mmap_mode="r")
    n, dim = stored.shape
    gen = Synthetic(dim, n, 0)  # the set's topics: its basis and centres come from seed 0
    c = clipsearch.open(db, create=False)
    c.search(vector=gen.texts(1)[0], limit=10)
    started = time.perf_counter()
    c.store.keep_resident(c.namespace)
    locked = time.perf_counter() - started
    index = c.store._indexes[(c.namespace, "image")]
    file = index.file
    gathered: list[float] = []
    if file is not None:  # IVF-PQ: time each gather of re-ranked rows
        read16 = file.read16

        def timed(seqs: np.ndarray, *args: int) -> np.ndarray:
            t = time.perf_counter()
            out = read16(seqs, *args)
            gathered.append(time.perf_counter() - t)
            return out

        file.read16 = timed
    anon = np.ones(((4 << 30) // (dim * 2), dim), dtype=np.float16)  # written: every page touched

    def control(rows: int) -> tuple[float, float]:
        picks = np.sort(gen.rng.choice(len(anon), rows, replace=False))
        t = time.perf_counter()
        anon.take(picks, axis=0)
        first = time.perf_counter() - t
        t = time.perf_counter()
        anon.take(picks, axis=0)
        return first, time.perf_counter() - t

    out, first_round = [], None
    for r in range(args.rounds + 1):
        if r < args.rounds:
            gen.rng = np.random.default_rng(1000 + r)
            half = args.queries // 2
            picks = np.sort(gen.rng.choice(n, args.queries - half, replace=False))
            near = np.asarray(stored[picks], dtype=np.float32)
            near += 0.005 * gen.rng.standard_normal(near.shape).astype(np.float32)
            near /= np.linalg.norm(near, axis=1, keepdims=True)
            queries = np.concatenate([gen.texts(half), near]).astype(np.float32)
            first_round = queries if first_round is None else first_round
            label = f"{r + 1}: new queries"
        else:
            queries, label = first_round, "again: round 1's queries"
        gathered.clear()
        times = []
        for q in queries:
            t = time.perf_counter()
            c.search(vector=q, limit=10)
            times.append(time.perf_counter() - t)
        a, b = control(index.rerank if file is not None else 1019)
        out.append(
            [
                label,
                f"{pct(times, 50) * 1000:.1f}",
                f"{pct(times, 99) * 1000:.1f}",
                f"{pct(gathered, 50) * 1000:.1f}" if gathered else "-",
                f"{a * 1000:.1f} ({b * 1000:.2f})",
            ]
        )
        print(" | ".join(out[-1]), flush=True)
    info = c.info()
    print_table(
        f"New queries round after round, one process: {info.items:,} live of {n:,} x {dim}, {info.index.kind}"
        + (f", {index.rerank:,} candidates re-ranked" if file is not None else "")
        + (f", vectors locked in {locked:.1f} s" if args.lock else "")
        + (", from a cold page cache" if args.cold else ""),
        ["round", "p50 (ms)", "p99 (ms)", "gathering re-ranked rows, p50 (ms)", "control: random rows, anon (ms)"],
        out,
    )
    c.close()


if __name__ == "__main__":
    main()
