"""How many IVF lists a collection needs: the share of each query's true top 10 that lies in the
lists it visits (the ceiling that codes and re-ranking cannot lift), for several list counts,
on a store that ``benchmarks/scale.py --keep`` left (its fp16 vectors and queries).

    python benchmarks/ivf_lists.py --reuse DIR [--lists 4096,16384] [--threads 1] [--sphere]

Each list count's centroids are trained as the library trains an IVF index (k-means on a random
sample, ``--per`` vectors a list, centroids left as their lists' means); above 4,096 lists k-means
assigns the sample, and the true neighbours are assigned, through an HNSW graph of the centroids
(what FAISS's ``IVF..._HNSW32`` does, and the library when it adds), which keeps 16,384 lists to
minutes. ``--sphere`` also trains centroids scaled onto the unit sphere (FAISS's default for
inner product, the library's before). Only the true neighbours are assigned to lists, so no
index is built; the codes scanned are estimated from the lists' sizes in a 500,000-vector sample.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table
from scale import exact_top, numbers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", required=True, help="the folder `scale.py --keep` left")
    ap.add_argument("--lists", type=numbers(int), default=[4096, 16384])
    ap.add_argument("--per", type=int, default=0, help="training vectors a list (default: 40 to 4,096 lists, else 20)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sphere", action="store_true", help="also centroids on the unit sphere (FAISS's default)")
    args = ap.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    work = Path(args.reuse)
    vectors = np.load(work / "vectors.npy", mmap_mode="r")
    queries = np.load(work / "queries.npy").astype(np.float32)
    n, dim = vectors.shape
    half = len(queries) // 2  # scale.py: text queries first, then image queries
    t = time.perf_counter()
    truth = exact_top(vectors, queries, None)
    print(f"exact top 10 of {len(queries)} queries: {time.perf_counter() - t:.0f} s", flush=True)
    rows_needed = np.array(sorted(set().union(*truth)))
    neighbours = np.asarray(vectors[rows_needed], dtype=np.float32)
    rng = np.random.default_rng(0)
    rows = []
    for nlist, sphere in [(nlist, sphere) for nlist in args.lists for sphere in (False, True)[: 1 + args.sphere]]:
        hnsw = nlist > 4096
        per = args.per or (20 if hnsw else 40)
        t = time.perf_counter()
        sample = np.asarray(vectors[np.sort(rng.choice(n, min(n, nlist * per), replace=False))], dtype=np.float32)
        cp = faiss.ClusteringParameters()
        cp.niter, cp.max_points_per_centroid, cp.spherical = 10 if hnsw else 25, per, sphere
        cp.min_points_per_centroid = per // 2
        clustering = faiss.Clustering(dim, nlist, cp)
        how = f"{len(sample):,} x{cp.niter} ({'HNSW' if hnsw else 'flat'}{', sphere' if sphere else ''})"
        assign = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT) if hnsw else faiss.IndexFlatIP(dim)
        clustering.train(sample, assign)
        trained = time.perf_counter() - t
        points = faiss.vector_float_to_array(clustering.centroids).reshape(nlist, dim)
        centroids = faiss.IndexFlatIP(dim)
        centroids.add(points)
        adding = centroids
        if hnsw:  # as the library adds: through an HNSW graph of the centroids
            adding = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            adding.hnsw.efSearch = 64
            adding.add(points)
        list_of = dict(zip(rows_needed.tolist(), adding.search(neighbours, 1)[1].ravel().tolist(), strict=True))
        probe_sample = np.asarray(vectors[: min(n, 500_000)], dtype=np.float32)
        sizes = np.bincount(centroids.search(probe_sample, 1)[1].ravel(), minlength=nlist) * (n / len(probe_sample))
        for nprobe in (nlist // 128, nlist // 64, nlist // 32, nlist // 16):
            _, probed = centroids.search(queries, nprobe)
            inside = np.array([[list_of[r] in lists for r in truth[q]] for q, lists in enumerate(map(set, probed))])
            scanned = np.mean([sizes[probed[q]].sum() for q in range(len(queries))])
            text, image = inside[:half].mean(), inside[half:].mean()
            row = [f"{nlist:,}", how, f"{trained:.0f} s", f"{nprobe:,}", f"{scanned:,.0f}"]
            rows.append([*row, f"{text:.3f}", f"{image:.3f}"])
    print_table(
        f"Coarse recall@10 of IVF lists, {n:,} x {dim}",
        ["lists", "trained on", "training", "lists visited", "codes scanned", "text", "image"],
        rows,
    )


if __name__ == "__main__":
    main()
