"""Catalog scale: build, memory, latency, recall and filters from 100k to 10M vectors.

The vectors: a synthetic set harder than `query.py`'s, or your own (`--vectors FILE.npy`, e.g.
`clipsearch export --npy` output, with `--queries FILE.npy`). Synthetic: image vectors around
topics whose sizes follow Zipf's law (a few huge topics, a long tail), 5% of them near-duplicates
of another row; text queries drawn around the topics in the text cone (cosine ~0.3 from the
images, as CLIP's are) and image queries near stored vectors. Metadata: `client` assigned at
random (10%, 1%, 0.1%, 0.01% of the rows) and `category` by topic (whole topics adding up to
about the same shares): a filter that agrees with the query's neighbourhood, or avoids it.

Everything goes through the library as a user's would: vectors come in with
`Collection.import_vectors` (what `clipsearch import` runs), `Collection.build_index` builds the
index the memory budget chooses (`--index-memory`, `--kind`), and a separate serving process
opens the store cold and measures: open to first answer, p50/p99 of one client and of two, recall@10
against an exact scan, hits returned and recall under each filter, and its anonymous memory
apart from the page cache (`RssAnon`, `RssFile` in /proc/self/status; `--lock-vectors` serves with
`CLIPSEARCH_LOCK_VECTORS=1` and adds what it locked, `VmLck`; `--cold` first drops the store's files
from the page cache). Then the updates: rows
added (10% more; the index appends without retraining) and deleted (1%, then 25% in all;
`--deletes 0.01,0.25,0.6` goes on past half of the IVF-PQ fp16 file, which is then rewritten),
each timed to the first answer that reflects it and to its index file written.

On PostgreSQL (`--db postgresql://...`, an empty database on a server with pgvector 0.8) the
same set goes into a halfvec table with its HNSW index, and the serving process asks the server;
`--bq` also builds a binary-quantised HNSW index on the same table and measures it with each
re-ranked inner LIMIT (the other index choice for large tables).

    python benchmarks/scale.py [--n 1000000] [--queries 200] [--index-memory 6G] [--kind auto]
    python benchmarks/scale.py --vectors mine.npy --queries-file texts.npy
    python benchmarks/scale.py --n 1000000 --db postgresql://localhost/scale --bq 40,100,200 --skip-updates
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import drop_from_page_cache, pct, print_table

HERE = Path(__file__).resolve().parent
SHARES = {"10%": 0.10, "1%": 0.01, "0.1%": 0.001, "0.01%": 0.0001}
CHUNK = 100_000


# -- the synthetic set ----------------------------------------------------------------------------
class Synthetic:
    def __init__(self, dim: int, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim, self.rng = dim, rng
        self.topics = max(100, n // 1000)
        weights = 1.0 / np.arange(1, self.topics + 1) ** 1.1  # Zipf
        self.weights = weights / weights.sum()
        self.basis = np.linalg.qr(rng.standard_normal((dim, 96)))[0].T.astype(np.float32)
        self.centres = (rng.standard_normal((self.topics, 96)) / 7.0).astype(np.float32)
        u, v = np.linalg.qr(rng.standard_normal((dim, 2)))[0].T.astype(np.float32)
        self.image_mean, self.text_mean = u, 0.3 * u + np.sqrt(1 - 0.3**2) * v

    def _draw(self, topics: np.ndarray, mean: np.ndarray, spread: float, noise: float) -> np.ndarray:
        m = len(topics)
        z = self.centres[topics] + spread * self.rng.standard_normal((m, 96)).astype(np.float32)
        x = mean + z @ self.basis + noise * self.rng.standard_normal((m, self.dim)).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def images(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        topics = self.rng.choice(self.topics, m, p=self.weights)
        x = self._draw(topics, self.image_mean, 0.07, 0.02)
        dup = np.flatnonzero(self.rng.random(m) < 0.05)  # near-duplicates of a row of this chunk
        if len(dup):
            src = self.rng.integers(0, m, len(dup))
            x[dup] = x[src] + 0.01 * self.rng.standard_normal((len(dup), self.dim)).astype(np.float32)
            x[dup] /= np.linalg.norm(x[dup], axis=1, keepdims=True)
            topics[dup] = topics[src]
        return x, topics

    def texts(self, m: int) -> np.ndarray:
        return self._draw(self.rng.integers(0, self.topics, m), self.text_mean, 0.12, 0.05)


def categories(topic_of: np.ndarray, topics: int) -> dict[str, np.ndarray]:
    """Whole topics, from the small end, adding up to about each share (at least one topic)."""
    sizes = np.bincount(topic_of, minlength=topics)
    order = np.argsort(sizes, kind="stable")
    out: dict[str, np.ndarray] = {}
    n = len(topic_of)
    used: set[int] = set()
    for label, share in sorted(SHARES.items(), key=lambda kv: kv[1]):
        chosen, total = [], 0
        for t in order[::-1]:  # largest first that still fits, then the next ...
            if t in used or sizes[t] == 0 or total + sizes[t] > share * n * 1.2:
                continue
            chosen.append(int(t))
            total += sizes[t]
            if total >= share * n * 0.8:
                break
        if not chosen:
            chosen = [int(next(t for t in order if sizes[t] and t not in used))]
        used.update(chosen)
        out[label] = np.array(chosen)
    return out


def make_data(work: Path, args: argparse.Namespace) -> dict:
    """The vectors (.npy), their metadata (.jsonl) and the queries, written in chunks."""
    started = time.perf_counter()
    vec_path, meta_path = work / "vectors.npy", work / "meta.jsonl"
    if args.vectors:
        src = np.load(args.vectors, mmap_mode="r")
        n, dim = src.shape
        topic_of = np.zeros(n, dtype=np.int64)  # no topics: category filters are skipped
        vec_path = Path(args.vectors)
        queries = np.load(args.queries_file).astype(np.float32) if args.queries_file else None
        gen = Synthetic(dim, n, args.seed)
        if queries is None:
            picks = gen.rng.choice(n, args.queries, replace=False)
            queries = np.asarray(src[np.sort(picks)], dtype=np.float32)
        kinds = ["given"] * len(queries)
        cats: dict[str, np.ndarray] = {}
    else:
        n, dim = args.n, args.dim
        gen = Synthetic(dim, n, args.seed)
        # fp16, as clip-retrieval keeps embeddings: half the disk at 10M (10 GB), and the store
        # receives exactly these values, so the exact answers computed from them are exact
        out = np.lib.format.open_memmap(vec_path, mode="w+", dtype=np.float16, shape=(n, dim))
        topic_of = np.empty(n, dtype=np.int64)
        for start in range(0, n, CHUNK):
            x, t = gen.images(min(CHUNK, n - start))
            out[start : start + len(x)] = x
            topic_of[start : start + len(x)] = t
        out.flush()
        cats = categories(topic_of, gen.topics)
        half = args.queries // 2
        picks = gen.rng.choice(n, args.queries - half, replace=False)
        # another photo of a stored item's subject: cosine ~0.99 to it
        near = np.asarray(out[np.sort(picks)]) + 0.005 * gen.rng.standard_normal((len(picks), dim)).astype(np.float32)
        near /= np.linalg.norm(near, axis=1, keepdims=True)
        queries = np.concatenate([gen.texts(half), near]).astype(np.float32)
        kinds = ["text"] * half + ["image"] * len(picks)
        del out
    draw = gen.rng.random(n)
    client = np.full(n, "rest", dtype=object)
    edge = 0.0
    for label, share in SHARES.items():
        client[(draw >= edge) & (draw < edge + share)] = f"c{label}"
        edge += share
    topic_label = {int(t): label for label, ts in cats.items() for t in ts}
    with meta_path.open("w") as f:
        for i in range(n):
            record = {"id": f"i{i}", "client": client[i]}
            if cats:
                record["category"] = f"k{topic_label[int(topic_of[i])]}" if int(topic_of[i]) in topic_label else "other"
            f.write(json.dumps(record) + "\n")
    np.save(work / "queries.npy", queries)
    filters = {f"client={'c' + label}": np.flatnonzero(client == f"c{label}") for label in SHARES}
    for label, ts in cats.items():
        filters[f"category={'k' + label}"] = np.flatnonzero(np.isin(topic_of, ts))
    return {
        "vectors": vec_path,
        "meta": meta_path,
        "n": n,
        "dim": dim,
        "queries": queries,
        "kinds": kinds,
        "filters": filters,
        "seconds": time.perf_counter() - started,
    }


# -- exact answers ----------------------------------------------------------------------------------
def exact_top(
    vectors: np.ndarray, queries: np.ndarray, rows: np.ndarray | None, k: int = 10, extra: np.ndarray | None = None
) -> list[set[int]]:
    """The exact top k row numbers for each query (among ``rows`` when given, and the rows of
    ``extra`` numbered after ``vectors``'), a chunk at a time."""
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    chunks: list[tuple[np.ndarray, np.ndarray]] = []
    total = len(rows) if rows is not None else len(vectors)
    for start in range(0, total, 200_000):
        idx = rows[start : start + 200_000] if rows is not None else np.arange(start, min(start + 200_000, total))
        chunks.append((idx, vectors))
    if extra is not None:
        chunks += [(np.arange(s, min(s + 200_000, len(extra))), extra) for s in range(0, len(extra), 200_000)]
    for idx, source in chunks:
        scores = queries @ np.asarray(source[idx], dtype=np.float32).T
        number = idx + (len(vectors) if source is extra else 0)
        s = np.concatenate([best_s, scores], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(number, (len(queries), len(idx)))], axis=1)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, top, axis=1), np.take_along_axis(i, top, axis=1)
    return [set(r[r >= 0].tolist()) for r in best_i]


# -- the serving process --------------------------------------------------------------------------
SERVE = r"""
import json, os, sys, threading, time
import numpy as np
started = time.perf_counter()
import clipsearch
db, queries_path, filters_json, phase = sys.argv[1:5]
queries = np.load(queries_path)
filters = json.loads(filters_json)

def rss():
    f = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith(("RssAnon", "RssFile", "VmLck")))
    return {k: int(v.split()[0]) * 1024 for k, v in f.items()}

c = clipsearch.open(db, create=False)
first = c.search(vector=queries[0], limit=10)
out = {"cold_s": time.perf_counter() - started, "phase": phase, "paths": {}}
if os.environ.get("CLIPSEARCH_LOCK_VECTORS"):  # as `serve` does before it says it is healthy
    c.store.keep_resident(c.namespace)
    out["ready_s"] = time.perf_counter() - started
def run(qs, flt=None):
    times, ids = [], []
    for q in qs:
        t = time.perf_counter()
        hits = c.search(vector=q, limit=10, filter=flt)
        times.append(time.perf_counter() - t)
        ids.append([int(h.id[1:]) for h in hits])
    return times, ids
times, ids = run(queries)
out["times"], out["ids"] = times, ids
if phase == "serve":
    half = len(queries) // 2
    both = [None, None]
    def client(j):
        both[j] = run(queries[j * half:(j + 1) * half])[0]
    threads = [threading.Thread(target=client, args=(j,)) for j in range(2)]
    t0 = time.perf_counter()
    for t in threads: t.start()
    for t in threads: t.join()
    out["two_clients"] = both[0] + both[1]
    out["two_clients_wall"] = time.perf_counter() - t0
    out["filters"] = {}
    for name in filters:
        key, value = name.split("=")
        first = run(queries[:1], {key: value})[0][0]  # finds the filter's rows, kept after
        before = dict(getattr(c.store, "search_paths", {}))
        t, i = run(queries, {key: value})
        out["filters"][name] = {"times": t, "ids": i, "first": first}
        after = getattr(c.store, "search_paths", {})  # PostgreSQL: which plan answered
        out["paths"][name] = {p: n - before.get(p, 0) for p, n in after.items() if n > before.get(p, 0)}
out["rss"] = rss()
out["index"] = c.info().index.__dict__
print(json.dumps(out))
"""


def serve(db: Path | str, queries_path: Path, filters: list[str], phase: str, extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), **(extra or {})}
    cmd = [sys.executable, "-c", SERVE, str(db), str(queries_path), json.dumps(filters), phase]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr)
    return json.loads(done.stdout)


def recall(got: list[list[int]], truth: list[set[int]]) -> float:
    return float(np.mean([len(set(g) & t) / max(1, min(10, len(t))) for g, t in zip(got, truth, strict=True)]))


def size_of(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB" if n < 2**30 else f"{n / 2**30:,.2f} GB"


def numbers(kind: type) -> Callable[[str], list]:
    """An argparse type: ``256,0,2048`` -> [256, 0, 2048]."""
    return lambda text: [kind(x) for x in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--vectors", help="your own vectors (.npy, N x D) instead of the synthetic set")
    ap.add_argument("--queries-file", help="query vectors (.npy) for --vectors (default: rows of it)")
    ap.add_argument("--index-memory", default="", help="CLIPSEARCH_INDEX_MEMORY for the build (6G, 512M)")
    ap.add_argument("--kind", default="auto", help="index kind: auto, flat, hnsw or ivfpq")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="a folder to build in (default: a temporary one, removed after)")
    ap.add_argument("--skip-updates", action="store_true", help="stop after the serving measurements")
    ap.add_argument("--keep", action="store_true", help="keep the built store (for --reuse)")
    ap.add_argument("--reuse", help="serve from a store --keep left, without building it again")
    ap.add_argument(
        "--import-only",
        action="store_true",
        help="stop after the import (implies --keep): build later with `clipsearch index build`, then --reuse",
    )
    ap.add_argument(
        "--rerank",
        type=numbers(int),
        default=[],
        help="also measure unfiltered queries with CLIPSEARCH_IVF_RERANK at each value (0: by size)",
    )
    ap.add_argument(
        "--nprobe",
        type=numbers(int),
        default=[],
        help="also measure unfiltered queries with CLIPSEARCH_IVF_NPROBE at each value",
    )
    ap.add_argument(
        "--cold", action="store_true", help="drop the store's files from the page cache before the serving process"
    )
    ap.add_argument(
        "--lock-vectors", action="store_true", help="serve with CLIPSEARCH_LOCK_VECTORS=1 (vectors locked in memory)"
    )
    ap.add_argument("--db", help="a postgresql:// URL (an empty database) instead of a SQLite file in the folder")
    ap.add_argument(
        "--bq",
        type=numbers(int),
        default=[],
        help="PostgreSQL: also measure a binary-quantised HNSW index, re-ranking each inner LIMIT",
    )
    ap.add_argument(
        "--deletes",
        type=numbers(float),
        default=[0.01, 0.25],
        help="shares deleted in turn, each in all (default 0.01,0.25)",
    )
    args = ap.parse_args()
    if args.index_memory:
        os.environ["CLIPSEARCH_INDEX_MEMORY"] = args.index_memory
    sys.path.insert(0, str(HERE.parent / "src"))
    import clipsearch
    from clipsearch.identity import ModelIdentity

    with folder(args) as work:
        db, qpath = args.db or work / "scale.db", work / "queries.npy"
        postgres = bool(args.db)
        model = ModelIdentity("open_clip", "synthetic", "", args.dim, {})
        if args.reuse:  # a store --keep left: straight to serving
            vectors = np.load(work / "vectors.npy", mmap_mode="r")
            n, dim, queries = len(vectors), vectors.shape[1], np.load(qpath)
            with (work / "filters.pkl").open("rb") as f:
                data = {"n": n, "dim": dim, "queries": queries, **pickle.load(f)}
            with (work / "truth.pkl").open("rb") as f:
                filter_truth = pickle.load(f)
            truth = filter_truth.pop("")
            phases = [["(a store built before: --reuse)", ""]]
            with clipsearch.open(db, create=False) as c:  # closed: see drop_from_page_cache
                status = c.info().index
        else:
            data = make_data(work, args)
            n, dim, queries = data["n"], data["dim"], data["queries"]
            vectors = np.load(data["vectors"], mmap_mode="r")
            phases = [["generate vectors and metadata", f"{data['seconds']:.0f} s"]]
            c = clipsearch.open(db)
            t = time.perf_counter()
            done = c.import_vectors(data["vectors"], data["meta"], model=model)  # what `clipsearch import` runs
            phases.append(
                [
                    f"import {done:,} vectors (Collection.import_vectors, 10k a transaction)",
                    f"{time.perf_counter() - t:.0f} s",
                ]
            )
            if not args.import_only:
                t = time.perf_counter()
                status = c.build_index(args.kind)
                phases.append([f"build the index: {status.kind}", f"{time.perf_counter() - t:.0f} s"])
            c.close()
            t = time.perf_counter()
            truth = exact_top(vectors, queries, None)
            filter_truth = {name: exact_top(vectors, queries, rows) for name, rows in data["filters"].items()}
            phases.append(["exact answers (numpy, for recall)", f"{time.perf_counter() - t:.0f} s"])
            if args.keep or args.import_only:
                with (work / "filters.pkl").open("wb") as f:
                    pickle.dump({"filters": data["filters"], "kinds": data["kinds"]}, f)
                with (work / "truth.pkl").open("wb") as f:
                    pickle.dump({"": truth, **filter_truth}, f)
            if args.import_only:
                print_table(f"Import: {n:,} x {dim}", ["phase", "time"], phases)
                return
        if postgres:
            sizes = postgres_sizes(str(db))
        else:
            index_files = sorted((work / "scale.db-index").glob("*"))
            sizes = [
                ["database (SQLite: metadata, fp32 vectors, keywords)", mb(size_of([db, Path(f"{db}-wal")]))],
                *[[f"index file {p.name}", mb(p.stat().st_size)] for p in index_files if p.is_file()],
            ]
        lock = {"CLIPSEARCH_LOCK_VECTORS": "1"} if args.lock_vectors else {}
        if args.cold and not postgres:
            drop_from_page_cache(Path(db))
        s = serve(db, qpath, list(data["filters"]), "serve", lock)
        kinds = np.array(data["kinds"])
        rows = []
        for kind in sorted(set(kinds)):
            sel = np.flatnonzero(kinds == kind)
            times = [s["times"][i] for i in sel]
            rows.append(
                [
                    f"{kind} queries, one client",
                    f"{pct(times, 50) * 1000:.1f}",
                    f"{pct(times, 99) * 1000:.1f}",
                    f"{recall([s['ids'][i] for i in sel], [truth[i] for i in sel]):.3f}",
                    "10",
                ]
            )
        two = s["two_clients"]
        rows.append(
            [
                "all, two clients at once",
                f"{pct(two, 50) * 1000:.1f}",
                f"{pct(two, 99) * 1000:.1f}",
                "",
                f"{len(two) / s['two_clients_wall']:.0f} q/s",
            ]
        )
        reranked = []
        variants = [("CLIPSEARCH_IVF_RERANK", v) for v in args.rerank]
        variants += [("CLIPSEARCH_IVF_NPROBE", v) for v in args.nprobe]
        for name, value in variants:
            r = serve(db, qpath, [], "after", {name: str(value)})
            probe = value if name == "CLIPSEARCH_IVF_NPROBE" else 0
            for kind in sorted(set(kinds)):
                sel = np.flatnonzero(kinds == kind)
                times = [r["times"][i] for i in sel]
                reranked.append(
                    [
                        f"{name[len('CLIPSEARCH_IVF_') :].lower()}={value}"
                        + ("" if value and probe == 0 else f" (rerank {rerank_by_size(n, status.lists, probe)})"),
                        kind,
                        f"{pct(times, 50) * 1000:.1f}",
                        f"{pct(times, 99) * 1000:.1f}",
                        f"{recall([r['ids'][i] for i in sel], [truth[i] for i in sel]):.3f}",
                    ]
                )
        frows = []
        for name, rows_allowed in data["filters"].items():
            f = s["filters"][name]
            want = min(10, len(rows_allowed))
            short = sum(len(g) < want for g in f["ids"])
            frows.append(
                [
                    name,
                    f"{len(rows_allowed):,}",
                    f"{recall(f['ids'], filter_truth[name]):.3f}" if len(rows_allowed) else "(no rows)",
                    f"{short} of {len(f['ids'])}",
                    f"{pct(f['times'], 50) * 1000:.1f}",
                    f"{pct(f['times'], 99) * 1000:.1f}",
                    f"{f['first'] * 1000:.0f}",
                    *([", ".join(f"{p} {n}" for p, n in sorted(s["paths"][name].items()))] if postgres else []),
                ]
            )
        memory = [
            ["open to first answer (new process: imports, store, index)", f"{s['cold_s']:.2f} s"],
            *([["vectors locked in memory, queries measured from then", f"{s['ready_s']:.2f} s"]] if lock else []),
            [
                "anonymous memory (RssAnon) after the queries" + (" (the client's)" if postgres else ""),
                mb(s["rss"]["RssAnon"]),
            ],
            ["file pages mapped (RssFile: page cache, shared)", mb(s["rss"]["RssFile"])],
            *([["of them locked in memory (VmLck: CLIPSEARCH_LOCK_VECTORS)", mb(s["rss"]["VmLck"])]] if lock else []),
        ]
        bq = postgres_bq(str(db), queries, kinds, truth, args.bq, phases) if args.bq else []
        # printed now: the updates below take long at 10M, and a run that dies in them keeps these
        title = f"{n:,} x {dim} {'given' if args.vectors else 'synthetic'} vectors, {os.cpu_count()} cores"
        print_table(f"Build: {title}", ["phase", "time"], phases)
        print_table("Files", ["file", "size"], sizes)
        print_table("Serving process", ["measure", "value"], memory)
        print_table(
            f"Unfiltered search, k=10, index {s['index']['kind']} ({s['index']['reason']})",
            ["queries", "p50 (ms)", "p99 (ms)", "recall@10", "hits / throughput"],
            rows,
        )
        print_table(
            "Filtered search, k=10 (client: at random; category: whole topics)",
            ["filter", "rows", "recall@10", "queries short of min(10, rows)", "p50 (ms)", "p99 (ms)", "first (ms)"]
            + (["plan (queries)"] if postgres else []),
            frows,
        )
        if bq:
            print_table(
                "PostgreSQL: binary-quantised HNSW (bit_hamming_ops), inner LIMIT re-ranked by halfvec <#>",
                ["inner LIMIT", "queries", "p50 (ms)", "p99 (ms)", "recall@10"],
                bq,
            )
        if reranked:
            print_table(
                "Unfiltered search by CLIPSEARCH_IVF_RERANK (candidates re-scored) and _NPROBE (lists visited)",
                ["setting", "queries", "p50 (ms)", "p99 (ms)", "recall@10"],
                reranked,
            )
        sys.stdout.flush()
        updates = []
        if not args.skip_updates:
            gen = Synthetic(dim, n, args.seed + 1)
            c = clipsearch.open(db)
            add = max(1, n // 10)
            added = np.lib.format.open_memmap(work / "added.npy", mode="w+", dtype=np.float16, shape=(add, dim))
            t = time.perf_counter()
            for start in range(0, add, 10_000):
                x, _ = gen.images(min(10_000, add - start))
                x = x.astype(np.float16).astype(np.float32)  # what `added` holds for the exact answers
                added[start : start + len(x)] = x
                ids = [f"i{n + start + j}" for j in range(len(x))]
                c.add_vectors(ids, x, [{"client": "rest"}] * len(x), model=model)
            stored = time.perf_counter() - t
            c.search(vector=queries[0], limit=10)
            updates.append(
                [
                    f"add {add:,} vectors (10%)",
                    f"{stored:.0f} s stored + {time.perf_counter() - t - stored:.1f} s index",
                    c.info().index.kind + (f", trained on {n:,}" if status.kind == "ivfpq" else ""),
                ]
            )
            print("update:", " | ".join(updates[-1]), flush=True)
            rng = np.random.default_rng(5)
            order = rng.permutation(n)
            already = 0
            for share in args.deletes:
                gone = order[: int(share * n)]
                t = time.perf_counter()
                for start in range(already, len(gone), 50_000):
                    c.delete([f"i{i}" for i in gone[start : start + 50_000]])
                already = len(gone)
                deleted = time.perf_counter() - t
                c.search(vector=queries[0], limit=10)
                answered = time.perf_counter() - t
                # the index file the answer began writing (and, past half removed, the fp16 file's
                # rewrite before it), so that the serving process below reads the index as it is now
                getattr(c.store, "wait_for_saves", lambda: None)()
                written = time.perf_counter() - t
                left = np.setdiff1d(np.arange(n), gone)
                after = serve(db, qpath, [], "after", lock)
                live_truth = exact_top(vectors, queries, left, extra=added)
                updates.append(
                    [
                        f"delete {len(gone):,} ({share:.0%} in all)",
                        f"{deleted:.1f} s deleted, first answer after {answered:.1f} s, "
                        f"index file written after {written:.0f} s",
                        f"p50 {pct(after['times'], 50) * 1000:.1f} ms, recall@10 "
                        + ", ".join(
                            f"{kind} {recall([after['ids'][i] for i in sel], [live_truth[i] for i in sel]):.3f}"
                            for kind in sorted(set(kinds))
                            for sel in [np.flatnonzero(kinds == kind)]
                        ),
                    ]
                )
                print("update:", " | ".join(updates[-1]), flush=True)
            c.close()
    if updates:
        print_table("Updates", ["change", "time", "after"], updates)


def postgres_sizes(url: str) -> list[list[str]]:
    """The namespace table's heap (with TOAST) and each of its indexes, as PostgreSQL counts them."""
    import psycopg

    with psycopg.connect(url) as conn:
        table = conn.execute("SELECT items_table FROM clipsearch_namespaces WHERE name = 'default'").fetchone()[0]
        heap = conn.execute("SELECT pg_table_size(%s::regclass)", (table,)).fetchone()[0]
        indexes = conn.execute(
            "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index "
            "WHERE indrelid = %s::regclass ORDER BY 1",
            (table,),
        ).fetchall()
        vtype = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass "
            "AND attname = 'embedding'",
            (table,),
        ).fetchone()[0]
    return [[f"table (PostgreSQL: metadata, {vtype} vectors, keywords)", mb(heap)]] + [
        [f"index {name}", mb(size)] for name, size in indexes
    ]


def postgres_bq(url: str, queries: np.ndarray, kinds: list[str], truth: list[set[int]], limits: list[int],
                phases: list[list[str]]) -> list[list[str]]:  # fmt: skip
    """Binary quantisation, the other index choice for a large table: an HNSW index on each
    vector's signs (``binary_quantize``, 1 bit a dimension, Hamming distance), whose inner LIMIT
    is re-ranked by the halfvec vectors (pgvector's documented recipe). Built and queried here
    with SQL, beside the library's halfvec index, to choose between them."""
    import psycopg
    from pgvector.psycopg import register_vector

    rows = []
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        table, dim = conn.execute(
            "SELECT items_table, dim FROM clipsearch_namespaces WHERE name = 'default'"
        ).fetchone()
        workers = conn.execute("SHOW max_parallel_workers").fetchone()[0]
        conn.execute(f"SET max_parallel_maintenance_workers = {int(workers)}")
        conn.execute("SET maintenance_work_mem = '2GB'")
        t = time.perf_counter()
        conn.execute(
            f'CREATE INDEX IF NOT EXISTS "{table}_bq" ON "{table}" USING hnsw '
            f"((binary_quantize(embedding)::bit({dim})) bit_hamming_ops) WITH (m = 32, ef_construction = 128)"
        )
        phases.append(["PostgreSQL: binary-quantised HNSW index (--bq)", f"{time.perf_counter() - t:.0f} s"])
        size = conn.execute("SELECT pg_relation_size(%s::regclass)", (f"{table}_bq",)).fetchone()[0]
        phases.append(["  its size", mb(size)])
        kinds_a = np.array(kinds)
        for limit in limits:
            conn.execute(f"SET hnsw.ef_search = {max(40, limit)}")
            sql = (
                f'SELECT id FROM (SELECT id, embedding FROM "{table}" ORDER BY binary_quantize(embedding)::bit({dim}) '
                f"<~> binary_quantize(%s::halfvec)::bit({dim}) LIMIT {int(limit)}) AS near "
                "ORDER BY embedding <#> %s::halfvec LIMIT 10"
            )
            times, ids = [], []
            for q in queries:
                t = time.perf_counter()
                found = conn.execute(sql, (q, q)).fetchall()
                times.append(time.perf_counter() - t)
                ids.append([int(r[0][1:]) for r in found])
            for kind in sorted(set(kinds)):
                sel = np.flatnonzero(kinds_a == kind)
                rows.append(
                    [
                        str(limit),
                        kind,
                        f"{pct([times[i] for i in sel], 50) * 1000:.1f}",
                        f"{pct([times[i] for i in sel], 99) * 1000:.1f}",
                        f"{recall([ids[i] for i in sel], [truth[i] for i in sel]):.3f}",
                    ]
                )
        conn.execute(f'DROP INDEX "{table}_bq"')  # the library's index stays the only one
    return rows


def rerank_by_size(n: int, lists: int, nprobe: int = 0) -> int:
    """What CLIPSEARCH_IVF_RERANK=0 gives an IVF-PQ index of ``n`` vectors (VectorIndex.rerank)."""
    from clipsearch.index import DEFAULT_RERANK, MAX_NPROBE, RERANK_SHARE

    nprobe = nprobe or min(MAX_NPROBE, max(16, lists // 32))
    return max(DEFAULT_RERANK, n * nprobe // max(1, lists) // RERANK_SHARE) if lists else 0


@contextlib.contextmanager
def folder(args: argparse.Namespace) -> Iterator[Path]:
    """Where the store is built: a temporary folder, removed after; kept with --keep (its path
    printed), or one --keep left (--reuse)."""
    if args.reuse:
        yield Path(args.reuse)
    elif args.keep or args.import_only:
        work = Path(tempfile.mkdtemp(prefix="scale-", dir=args.work))
        print(f"keeping the store in {work} (--reuse {work})", file=sys.stderr)
        yield work
    else:
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            yield Path(tmp)


if __name__ == "__main__":
    main()
