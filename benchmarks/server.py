"""Throughput and latency of `clipsearch serve` under load, clients on 127.0.0.1.

Starts the real server (a subprocess, ViT-B-32 with random weights by default), then runs each
load for a bounded time and prints p50/p99 latency and items/s:

- 1 client, one short text per request (/v1/embeddings)
- 32 concurrent clients, one short text each
- 4 concurrent clients, 8 images (~500x375 JPEG, base64) per request
- 1 client, text search (/api/v1/search) over the ingested photos

    python benchmarks/server.py [--seconds 10] [--model ViT-B-32] [--runtimes torch,onnx] [--port 8799]

Each runtime gets its own server, one after the other, on the same files in one run. The load
generator is aiohttp (`pip install -e '.[bench]'`); "client CPU" is its share of all cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import pct, photos, print_table, random_checkpoint, wait_healthy

NOUNS = ["cat", "dog", "red dress", "rocket", "cup of coffee", "mountain lake", "city at night", "bicycle"]


def text(i: int) -> str:
    return f"a photo of a {NOUNS[i % len(NOUNS)]} number {i}"  # distinct texts: no cache can help


async def run_load(url: str, clients: int, seconds: float, make_body, path: str, items_per_request: int):
    # aiohttp, not httpx, drives the load: on 127.0.0.1 the client shares the two cores with the
    # server, and httpx spends ~1.8 ms of CPU per request against aiohttp's ~0.1 ms, which would
    # be billed to the server. The client's own CPU share is reported with the results.
    latencies: list[float] = []
    stop_at = 0.0
    counter = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal counter
        while time.perf_counter() < stop_at:
            counter += 1
            body = orjson.dumps(make_body(counter))
            started = time.perf_counter()
            async with session.post(path, data=body, headers={"Content-Type": "application/json"}) as r:
                payload = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{path}: HTTP {r.status} {payload[:200]!r}")
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        stop_at = time.perf_counter() + min(2.0, seconds / 4)  # warm-up, not measured
        await asyncio.gather(*(client(session) for _ in range(clients)))
        latencies.clear()
        started, cpu_started = time.perf_counter(), time.process_time()
        stop_at = started + seconds
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    n = len(latencies)
    return {
        "requests": n,
        "p50": pct(latencies, 50) * 1000,
        "p99": pct(latencies, 99) * 1000,
        "items_s": n * items_per_request / elapsed,
        "client_cpu": cpu / elapsed / (os.cpu_count() or 1) * 100,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="measured time per load")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--port", type=int, default=8799)
    ap.add_argument("--images", type=int, default=64, help="distinct photos to send and to ingest")
    ap.add_argument("--runtimes", default="torch,onnx", help="comma-separated: torch, onnx, onnx-int8")
    args = ap.parse_args()

    checkpoint = random_checkpoint(args.model)
    files = photos(args.images)
    blobs = [base64.b64encode(p.read_bytes()).decode() for p in files]
    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-") as work:
        tmp = Path(work)
        db = tmp / "bench.db"
        listing = tmp / "list.csv"
        listing.write_text("".join(f"{p}\n" for p in files))
        env = {**os.environ, "CLIPSEARCH_MODEL": args.model, "CLIPSEARCH_WEIGHTS": str(checkpoint)}
        exe = [sys.executable, "-m", "clipsearch.cli"]
        subprocess.run(
            [*exe, "ingest", f"image-list:{listing}", "--db", str(db)], env=env, check=True, stdout=subprocess.DEVNULL
        )
        rows = []
        for runtime in args.runtimes.split(","):
            rows += bench_runtime(runtime.strip(), exe, env, db, blobs, args)
        print_table(
            f"clipsearch serve: {args.model} (random weights), {os.cpu_count()} CPUs, {args.seconds:g} s per load",
            ["runtime", "load", "requests", "p50 ms", "p99 ms", "throughput", "client CPU"],
            rows,
        )


def bench_runtime(runtime: str, exe: list[str], env: dict, db: Path, blobs: list[str], args) -> list[list[object]]:
    flags = {"torch": [], "onnx": ["--runtime", "onnx"], "onnx-int8": ["--runtime", "onnx", "--precision", "int8"]}
    if runtime not in flags:
        raise SystemExit(f"unknown runtime {runtime!r}")
    namespace = ["--namespace", "int8"] if runtime == "onnx-int8" else []
    if runtime == "onnx-int8":  # its own identity, so its own namespace
        subprocess.run(
            [*exe, "ingest", f"image-list:{db.parent / 'list.csv'}", "--db", str(db), *namespace, *flags[runtime]],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    server = subprocess.Popen(
        [*exe, "serve", "--db", str(db), "--port", str(args.port), "--log-level", "warning", *namespace]
        + flags[runtime],
        env=env,
    )
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_healthy(url, server)
        loads = [
            ("1 client, 1 short text", 1, lambda i: {"input": text(i)}, "/v1/embeddings", 1, "texts"),
            ("32 clients, 1 short text each", 32, lambda i: {"input": text(i)}, "/v1/embeddings", 1, "texts"),
            (
                "4 clients x 8 images (base64)",
                4,
                lambda i: {"input": [{"image": blobs[(i * 8 + k) % len(blobs)]} for k in range(8)]},
                "/v1/embeddings",
                8,
                "images",
            ),
            ("1 client, text search", 1, lambda i: {"text": text(i), "limit": 10}, "/api/v1/search", 1, "queries"),
        ]
        rows: list[list[object]] = []
        for name, clients, body, path, per, unit in loads:
            r = asyncio.run(run_load(url, clients, args.seconds, body, path, per))
            rows.append(
                [
                    runtime,
                    name,
                    r["requests"],
                    f"{r['p50']:.1f}",
                    f"{r['p99']:.1f}",
                    f"{r['items_s']:.1f} {unit}/s",
                    f"{r['client_cpu']:.0f}%",
                ]
            )
        return rows
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
