"""Catalog ingest over HTTP: the plain fetch-then-embed loop vs `clipsearch ingest catalog:`.

A local HTTP server (127.0.0.1) serves real photos with a latency per request, like a CDN far
away: by default 50-250 ms, and every 50th URL takes 3 s (a slow origin). Then, on the same
catalog, one run each:

- the plain loop a first script does: for each row, httpx.get, PIL decode, open_clip's
  preprocess, encode one image (on the first --plain rows only: it is slow);
- `clipsearch ingest catalog:...` with a cold cache, --concurrency 1 and 16;
- the same with a warm cache (a new database, the cache of the concurrency-16 run): no request.

It prints images/s (model loading excluded, as `ingest` reports it) and the ratio to the plain
loop. PyTorch fp32, ViT-B-32 with random weights (speed does not depend on them).

With ``--hanging PCT`` it measures instead what hanging hosts cost: the same catalog with no
hanging URL and with PCT% of its URLs (spread at random) answering nothing at all, each ingested
at default settings by a whole `clipsearch ingest` process, wall time, for this checkout and for
``--baseline REV`` (a git revision, checked out into a temporary worktree) side by side.

    python benchmarks/catalog.py [--count 300] [--plain 60] [--latency-ms 50-250] [--slow-every 50]
    python benchmarks/catalog.py --hanging 1 --count 1000 --baseline e6afc7a
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import photos, print_table, random_checkpoint, source_trees


def serve(files: list[Path], latency: tuple[float, float], slow_every: int) -> ThreadingHTTPServer:
    """/N.jpg: the N-th photo after a latency; /hang/N: accepts the request and never answers."""
    blobs = [f.read_bytes() for f in files]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.startswith("/hang/"):
                time.sleep(3600)
                return
            n = int(self.path.strip("/").split(".")[0])
            time.sleep(3.0 if slow_every and n % slow_every == slow_every - 1 else random.uniform(*latency))
            body = blobs[n]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def plain_loop(base: str, count: int, weights: Path) -> float:
    """images/s of the loop people write first (one request, one decode, one model call per row)."""
    import io

    import httpx
    import torch
    from PIL import Image

    from clipsearch._compat import import_open_clip

    open_clip = import_open_clip()
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=str(weights))
    model.eval()
    started = time.perf_counter()
    with httpx.Client() as client, torch.no_grad():
        for n in range(count):
            data = client.get(f"{base}/{n}.jpg").content
            image = Image.open(io.BytesIO(data)).convert("RGB")
            model.encode_image(preprocess(image).unsqueeze(0))
    return count / (time.perf_counter() - started)


def ingest(
    catalog: Path, db: Path, cache: Path, weights: Path, *extra: str, env: dict | None = None, ok: tuple = (0,)
) -> dict:
    cmd = [sys.executable, "-m", "clipsearch.cli", "ingest", f"catalog:{catalog}", "--db", str(db)]
    cmd += ["--id-column", "product_id", "--cache-dir", str(cache), "--weights", str(weights), "--json", *extra]
    env = {**os.environ, "CLIPSEARCH_DEVICE": "cpu", **(env or {})}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode not in ok:
        raise SystemExit(f"ingest failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def write_catalog(path: Path, base: str, count: int, hanging: set[int]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["product_id", "image_url", "title"])
        for n in range(count):
            writer.writerow([f"P{n:05d}", f"{base}/hang/{n}" if n in hanging else f"{base}/{n}.jpg", f"product {n}"])
    return path


def hanging_table(args: argparse.Namespace, base: str, weights: Path) -> None:
    """Whole-process wall of `clipsearch ingest` on a catalog without and with hanging URLs."""
    rng = random.Random(0)
    hanging = set(rng.sample(range(args.count), max(1, round(args.count * args.hanging / 100))))
    rows = []
    with tempfile.TemporaryDirectory() as tmp, source_trees(args.baseline, Path(tmp)) as trees:
        root = Path(tmp)
        catalogs = {
            "none": write_catalog(root / "clean.csv", base, args.count, set()),
            "hanging": write_catalog(root / "hanging.csv", base, args.count, hanging),
        }
        # a first ingest of a model exports its query towers once (a user cache both trees share):
        # paid here, so that no measured run pays it
        warm = root / "warm"
        warm.mkdir()
        ingest(write_catalog(root / "warm.csv", base, 20, set()), warm / "db.db", warm / "cache", weights)
        walls: dict[tuple[str, str], float] = {}
        reports: dict[tuple[str, str], dict] = {}
        for kind, catalog in catalogs.items():  # interleaved: before and after on each catalog in turn
            for label, src in trees.items():
                run = root / f"{label}-{kind}"
                run.mkdir()
                env = {"PYTHONPATH": str(src)}
                started = time.perf_counter()
                reports[label, kind] = ingest(catalog, run / "db.db", run / "cache", weights, env=env, ok=(0, 1))
                walls[label, kind] = time.perf_counter() - started
        for label in trees:
            clean, slow = walls[label, "none"], walls[label, "hanging"]
            report = reports[label, "hanging"]
            rows.append(
                [label, f"{clean:.1f}", f"{slow:.1f}", f"+{(slow / clean - 1) * 100:.0f}%",
                 f"{report['embedded']} / {report['failed']}"]
            )  # fmt: skip
    title = (
        f"Catalog of {args.count} URLs, {len(hanging)} of them hanging ({args.hanging:g}%), `clipsearch ingest` "
        f"at default settings, whole process, ViT-B-32 torch fp32 on {os.cpu_count()} cores"
    )
    print_table(title, ["tree", "no hanging URL (s)", "with hanging URLs (s)", "cost", "embedded / failed"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300, help="catalog rows")
    parser.add_argument("--plain", type=int, default=60, help="rows for the plain loop")
    parser.add_argument("--latency-ms", default="50-250", help="per-request latency range")
    parser.add_argument("--slow-every", type=int, default=50, help="every Nth URL takes 3 s (0: none)")
    parser.add_argument("--hanging", type=float, default=0, help="percent of URLs that never answer (see above)")
    parser.add_argument("--baseline", default="", help="with --hanging: a git revision to compare with")
    args = parser.parse_args()
    low, _, high = args.latency_ms.partition("-")
    latency = (float(low) / 1000, float(high or low) / 1000)
    weights = random_checkpoint("ViT-B-32")
    files = photos(args.count)
    server = serve(files, latency, 0 if args.hanging else args.slow_every)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    if args.hanging:
        hanging_table(args, base, weights)
        server.shutdown()
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        catalog = root / "products.csv"
        with catalog.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["product_id", "image_url", "title"])
            writer.writerows([f"P{n:05d}", f"{base}/{n}.jpg", f"product {n}"] for n in range(args.count))
        plain = plain_loop(base, min(args.plain, args.count), weights)
        rows.append(
            ["plain loop (httpx.get, decode, encode one)", f"{min(args.plain, args.count)}", f"{plain:.1f}", "1.0x"]
        )
        runs = [
            ("ingest, cold cache, --concurrency 1", "c1", ["--concurrency", "1"]),
            ("ingest, cold cache, --concurrency 16", "c16", ["--concurrency", "16"]),
        ]
        for label, name, extra in runs:
            report = ingest(catalog, root / f"{name}.db", root / f"{name}-cache", weights, *extra)
            rate = report["embedded"] / report["seconds"]
            rows.append([label, str(report["embedded"]), f"{rate:.1f}", f"{rate / plain:.1f}x"])
        report = ingest(catalog, root / "warm.db", root / "c16-cache", weights, "--offline")
        rate = report["embedded"] / report["seconds"]
        rows.append(["ingest, warm cache (no request)", str(report["embedded"]), f"{rate:.1f}", f"{rate / plain:.1f}x"])
    server.shutdown()
    title = f"Catalog ingest, ViT-B-32 torch fp32 on {os.cpu_count()} cores; latency {args.latency_ms} ms per URL" + (
        f", every {args.slow_every}th URL 3 s" if args.slow_every else ""
    )
    print_table(title, ["run", "images", "images/s", "vs plain"], rows)


if __name__ == "__main__":
    main()
