"""The exact index in NumPy (``clipsearch.index.ExactIndex``, what the core install searches with)
beside FAISS's ``IndexIDMap2(IndexFlatIP)``, which it replaced: the same vectors and queries,
search time per call (median over ~1 s of calls, FAISS at one OpenMP thread for fewer than 16
queries as clipsearch ran it), reading the saved index back, and whether both return the same
ids. Random unit vectors: an exact scan's cost does not depend on the values.

    python benchmarks/exact_index.py
    python benchmarks/exact_index.py --sizes 10000 50000 200000 --dim 512
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from _common import print_table
from clipsearch.index import ExactIndex


def per_call(fn: Callable[[], object], seconds: float = 1.0) -> float:
    fn()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    import faiss

    threads = faiss.omp_get_max_threads()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            vectors = rng.normal(size=(n, args.dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            seqs = np.arange(1, n + 1, dtype=np.int64)
            ours = ExactIndex(args.dim)
            ours.add(seqs, vectors)
            theirs = faiss.IndexIDMap2(faiss.IndexFlatIP(args.dim))
            theirs.add_with_ids(vectors, seqs)
            ours_path, theirs_path = Path(tmp) / f"ours{n}", Path(tmp) / f"theirs{n}"
            ours.save(ours_path)
            faiss.write_index(theirs, str(theirs_path))
            read_ours = per_call(lambda p=ours_path: ExactIndex.read(p, args.dim), 0.5)
            read_theirs = per_call(lambda p=theirs_path: faiss.read_index(str(p)), 0.5)
            for nq in args.queries:
                noise = rng.normal(scale=0.02, size=(nq, args.dim)).astype(np.float32)
                queries = vectors[rng.integers(0, n, nq)] + noise
                faiss.omp_set_num_threads(1 if nq < 16 else threads)
                t_ours = per_call(lambda: ours.search(queries, 10))  # noqa: B023
                t_theirs = per_call(lambda: theirs.search(queries, 10))  # noqa: B023
                same = np.array_equal(ours.search(queries, 10)[1], theirs.search(queries, 10)[1])
                rows.append([
                    f"{n:,}", nq, f"{t_ours * 1000:.2f}", f"{t_theirs * 1000:.2f}", f"{t_theirs / t_ours:.2f}x",
                    f"{read_ours * 1000:.1f} / {read_theirs * 1000:.1f}", "yes" if same else "NO",
                ])  # fmt: skip
    print_table(
        f"exact top-10, {args.dim}-d, {threads} cores: NumPy (ExactIndex) beside FAISS IndexFlatIP",
        ["vectors", "queries", "NumPy ms", "FAISS ms", "NumPy speed-up", "read ms (NumPy / FAISS)", "same ids"],
        rows,
    )


if __name__ == "__main__":
    main()
