"""Query speed: text embedding latency, and search latency + recall@10 at 100k and 1M vectors.

Part 1, text embedding (ViT-B-32 with random weights; speed does not depend on the values):
p50/p99 of one short query alone, and of 32 queries in one call, per runtime.

Part 2, search through the real store (SQLite + FAISS, the index `clipsearch` builds itself:
HNSW above 50k vectors) at 100k and 1M vectors: latency of `store.search` alone, of text query
embedding + search (what `clipsearch search "text"` and `/api/v1/search` do), and recall@10
against exact search (a full inner-product scan) over the same vectors.

The vectors are synthetic, since no million-image CLIP embedding set exists here: 512-d,
L2-normalised, with the shape of real CLIP embeddings rather than uniform noise: images cluster
around 1,000 topics in a 64-dimensional subspace, all inside one narrow cone (mean image-image
cosine ~0.5), and text queries come from their own cone beside it (the "modality gap"), so a
query's best image scores far below image-image neighbours. Recall on real embeddings may
differ; `--ef-search` shows the trade-off.

    python benchmarks/query.py [--sizes 100000,1000000] [--queries 200] [--runtimes torch,onnx]

The stores are built once (the 1M HNSW index takes about 6 minutes on 2 cores) and kept under
~/.cache/clipsearch-bench/query-store-*.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, pct, print_table, random_checkpoint

DIM = 512
SYNTHETIC_VERSION = 1  # bump when synthetic() changes, so cached stores are rebuilt
NOUNS = ["cat", "dog", "red dress", "rocket", "cup of coffee", "mountain lake", "city at night", "bicycle"]


def load(runtime: str, model: str):
    from clipsearch.encoders import ModelSpec, load_encoder

    flags = {"torch": {}, "onnx": {"runtime": "onnx"}, "onnx-int8": {"runtime": "onnx", "precision": "int8"}}
    return load_encoder(ModelSpec(model=model, weights=random_checkpoint(model), device="cpu", **flags[runtime]))


def timed(fn, repeats: int) -> list[float]:
    out = []
    for i in range(repeats):
        started = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - started)
    return out


def text_latency(encoders: dict, repeats: int) -> list[list[object]]:
    rows = []
    for runtime, enc in encoders.items():
        enc.embed_texts(["warm up"] * 32)
        one = timed(lambda i, e=enc: e.embed_texts([f"a photo of a {NOUNS[i % 8]} number {i}"]), repeats)
        many = timed(lambda i, e=enc: e.embed_texts([f"a {NOUNS[k % 8]} at {i}:{k}" for k in range(32)]), repeats // 4)
        for label, lat, n in (("1 short query", one, 1), ("32 queries, one call", many, 32)):
            p50 = pct(lat, 50)
            rows.append([runtime, label, f"{p50 * 1000:.1f}", f"{pct(lat, 99) * 1000:.1f}", f"{n / p50:.0f}"])
    return rows


def synthetic(n: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((DIM, 64)))[0].T.astype(np.float32)  # (64, DIM)
    topics = rng.standard_normal((1000, 64)).astype(np.float32) / 8.0
    u, v = np.linalg.qr(rng.standard_normal((DIM, 2)))[0].T.astype(np.float32)
    image_mean, text_mean = u, 0.3 * u + np.sqrt(1 - 0.3**2) * v  # the two cones, cosine 0.3 apart

    def draw(count: int, mean: np.ndarray, spread: float, noise: float) -> np.ndarray:
        chunks = []
        for start in range(0, count, 100_000):
            m = min(100_000, count - start)
            z = topics[rng.integers(0, len(topics), m)] + spread * rng.standard_normal((m, 64)).astype(np.float32)
            x = mean + z @ basis + noise * rng.standard_normal((m, DIM)).astype(np.float32)
            chunks.append(x / np.linalg.norm(x, axis=1, keepdims=True))
        return np.concatenate(chunks).astype(np.float32)

    return draw(n, image_mean, 0.06, 0.02), draw(queries, text_mean, 0.1, 0.05)


def exact_top(images: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ images.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    return top


def search_rows(size: int, queries: int, encoders: dict, ef_search: int) -> list[list[object]]:
    from clipsearch.encoders import ModelIdentity
    from clipsearch.index import IndexSettings
    from clipsearch.store import NewItem, open_store

    images, texts = synthetic(size, queries)
    # The store and its index are kept between runs (building HNSW over 1M vectors takes minutes
    # on 2 cores); the vectors are the same every run, from a fixed seed.
    folder = CACHE / f"query-store-{size}-v{SYNTHETIC_VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    store = open_store(folder / "q.db", IndexSettings(ef_search=ef_search))
    if store.namespace("default") is None or store.count("default") != size:
        store.close()
        shutil.rmtree(folder)
        folder.mkdir(parents=True)
        store = open_store(folder / "q.db", IndexSettings(ef_search=ef_search))
        identity = ModelIdentity(backend="synthetic", model="bench", pretrained="", dim=DIM)
        store.bind_namespace("default", identity, {})
        started = time.perf_counter()
        for start in range(0, size, 20_000):
            chunk = images[start : start + 20_000]
            items = [NewItem(f"img{start + i:07d}", {"n": start + i}) for i in range(len(chunk))]
            store.write_batch("default", items, chunk)
        print(f"{size:,} vectors stored in {time.perf_counter() - started:.0f} s", flush=True)
    started = time.perf_counter()
    status = store.build_index("default")
    print(f"{size:,} vectors: {status.kind} index ready in {time.perf_counter() - started:.0f} s", flush=True)

    truth = exact_top(images, texts, 10)
    index_of = {f"img{i:07d}": i for i in range(size)}
    store.search("default", texts[:5], 10)  # warm
    hits_found = 0
    lat = []
    for q in range(queries):
        t = time.perf_counter()
        hits = store.search("default", texts[q : q + 1], 10)[0]
        lat.append(time.perf_counter() - t)
        hits_found += len({index_of[h.item.id] for h in hits} & set(truth[q].tolist()))
    recall = hits_found / (10 * queries)
    texts_in = [f"a photo of a {NOUNS[i % 8]} number {i}" for i in range(queries)]

    index_name = f"{status.kind} (ef {ef_search})"
    rows = [[f"{size:,}", index_name, "search only", f"{pct(lat, 50) * 1000:.2f}", f"{pct(lat, 99) * 1000:.2f}",
             f"{recall:.3f}"]]  # fmt: skip
    for runtime, encoder in encoders.items():
        full = timed(lambda i, e=encoder: store.search("default", e.embed_texts([texts_in[i]]), 10), queries)
        rows.append([f"{size:,}", index_name, f"text embedding ({runtime}) + search", f"{pct(full, 50) * 1000:.2f}",
                     f"{pct(full, 99) * 1000:.2f}", f"{recall:.3f}"])  # fmt: skip
    exact_lat = timed(lambda i: exact_top(images, texts[i : i + 1], 10), min(queries, 30))
    rows.append([f"{size:,}", "exact scan (numpy)", "search only", f"{pct(exact_lat, 50) * 1000:.2f}",
                 f"{pct(exact_lat, 99) * 1000:.2f}", "1.000"])  # fmt: skip
    store.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--runtimes", default="torch,onnx", help="comma-separated: torch, onnx, onnx-int8")
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=200, help="timed calls per text-latency row")
    ap.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch (default: the store's)")
    args = ap.parse_args()
    from clipsearch.index import DEFAULT_EF_SEARCH

    encoders = {r.strip(): load(r.strip(), args.model) for r in args.runtimes.split(",")}
    print_table(
        f"text embedding: {args.model} (random weights), {os.cpu_count()} CPUs",
        ["runtime", "call", "p50 ms", "p99 ms", "texts/s at p50"],
        text_latency(encoders, args.repeats),
    )
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        rows += search_rows(size, args.queries, encoders, args.ef_search or DEFAULT_EF_SEARCH)
    print_table(
        f"search: {DIM}-d synthetic vectors, top 10, {args.queries} queries, {os.cpu_count()} CPUs",
        ["vectors", "index", "measured", "p50 ms", "p99 ms", "recall@10"],
        rows,
    )


if __name__ == "__main__":
    main()
