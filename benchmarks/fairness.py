"""Head-of-line blocking in `clipsearch serve`: how long a one-text query waits while others
send big or abandoned requests, before and after fair batching and cancellation.

Two loads, each against a server from ``--baseline`` (a git revision checked out into a
temporary worktree, run on the same virtual environment) and one from this tree, in one run:

- **big request**: one client sends 2048 texts in one request; 0.5 s later a second client
  sends one-text requests back to back until the big one is answered. Reported: how many
  one-text requests were answered meanwhile, the first one's latency, their p50 and maximum,
  and the big request's own time.
- **abandoned requests**: 30 clients each send 100 texts and hang up after 0.3 s; then one
  client sends one-text requests for 5 s. Reported: how many were answered, the first one's
  latency (right after the hang-ups), their p50 and maximum.

- **texts beside images** (``--loads mixed``): 8 clients send 8-image requests back to back
  (the image tower saturated) for ``--seconds``, alone and then beside a person searching (a
  one-text query every 250 ms). Reported: images/s in both, and the text queries' p50 and p99.
  Target: text p50 <= 100 ms and p99 <= 500 ms, images/s within 10% of images alone.

    python benchmarks/fairness.py [--baseline REV] [--model ViT-B-32] [--loads hol,mixed]

ViT-B-32 with random weights on the CPU (speed does not depend on the weights). One model call
here embeds up to 64 texts (``CLIPSEARCH_MAX_TEXT_BATCH``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, pct, print_table, random_checkpoint, run_server, source_trees


def texts(n: int, tag: str) -> list[str]:
    return [f"a photo of thing {tag}-{i}, seen from far away on a sunny day" for i in range(n)]


async def one_text_loop(client: httpx.AsyncClient, until: asyncio.Event | float) -> list[float]:
    """One-text requests back to back until ``until`` (an event, or a monotonic deadline)."""
    latencies, i = [], 0
    while not (until.is_set() if isinstance(until, asyncio.Event) else time.monotonic() > until):
        started = time.perf_counter()
        response = await client.post("/v1/embeddings", json={"input": f"a cat number {i}"})
        response.raise_for_status()
        latencies.append(time.perf_counter() - started)
        i += 1
    return latencies


async def big_request(url: str) -> tuple[list[float], float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as big, httpx.AsyncClient(base_url=url, timeout=600) as one:
        done = asyncio.Event()

        async def send_big() -> float:
            started = time.perf_counter()
            response = await big.post("/v1/embeddings", json={"input": texts(2048, "big")})
            response.raise_for_status()
            done.set()
            return time.perf_counter() - started

        task = asyncio.create_task(send_big())
        await asyncio.sleep(0.5)
        latencies = await one_text_loop(one, done)
        return latencies, await task


async def abandoned(url: str, port: int) -> list[float]:
    body = json.dumps({"input": texts(100, "gone")}).encode()
    socks = []
    for _ in range(30):
        s = socket.create_connection(("127.0.0.1", port))
        head = f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        s.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        socks.append(s)
    await asyncio.sleep(0.3)
    for s in socks:
        s.close()
    async with httpx.AsyncClient(base_url=url, timeout=600) as one:
        return await one_text_loop(one, time.monotonic() + 5.0)


def image_payload(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` photo-sized JPEGs (500x375, smooth colour fields with noise) as data URIs."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 255, (6, 8, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((500, 375), Image.BICUBIC)
        noisy = np.clip(np.asarray(img, np.int16) + rng.integers(-20, 20, (375, 500, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, "JPEG", quality=85)
        out.append({"image": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()})
    return out


async def image_clients(url: str, seconds: float, text_clients: int) -> tuple[float, list[float]]:
    """8 clients sending 8-image requests back to back for ``seconds``, and ``text_clients``
    people searching: a one-text query every 250 ms each. (images per second, text latencies)"""
    deadline = time.monotonic() + seconds
    images = 0
    latencies: list[float] = []

    async def image_client(k: int) -> None:
        nonlocal images
        payload = image_payload(8, seed=k)
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            while time.monotonic() < deadline:
                response = await c.post("/v1/embeddings", json={"input": payload})
                response.raise_for_status()
                if time.monotonic() <= deadline:
                    images += len(payload)

    async def text_client(k: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            i = 0
            await asyncio.sleep(1.0 + k * 0.05)  # the image clients are busy by then
            while time.monotonic() < deadline - 1.0:
                started = time.perf_counter()
                response = await c.post("/v1/embeddings", json={"input": f"a dog number {k}-{i}"})
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)
                i += 1
                await asyncio.sleep(0.25)

    started = time.monotonic()
    await asyncio.gather(*(image_client(k) for k in range(8)), *(text_client(k) for k in range(text_clients)))
    return images / (min(time.monotonic(), deadline) - started), latencies


def ms(values: list[float], q: float) -> str:
    return f"{pct(values, q) * 1000:.0f}" if values else "-"


def row(name: str, load: str, lat: list[float], big: str) -> list[object]:
    first = f"{lat[0] * 1000:.0f}" if lat else "-"
    return [name, load, len(lat), first, ms(lat, 50), f"{max(lat) * 1000:.0f}" if lat else "-", big]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="fe6b15b", help="git revision measured as 'before' ('' to skip)")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--loads", default="hol,mixed", help="hol (head-of-line), mixed (texts beside images)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each mixed-load run")
    args = parser.parse_args()
    loads = set(args.loads.split(","))
    mixed_rows = []
    checkpoint = random_checkpoint(args.model)
    env = {**os.environ, "CLIPSEARCH_MODEL": args.model, "CLIPSEARCH_WEIGHTS": str(checkpoint)}
    env["CLIPSEARCH_QUERY_RUNTIME"] = "torch"
    rows = []
    with tempfile.TemporaryDirectory() as tmp, source_trees(args.baseline, Path(tmp)) as trees:
        work = Path(tmp)
        for name, src in trees.items():
            port = free_port()
            server = run_server(src, env, work / f"{name}.db", port)
            url = f"http://127.0.0.1:{port}"
            try:
                httpx.post(url + "/v1/embeddings", json={"input": texts(64, "warm")}, timeout=600)
                if "hol" in loads:
                    one, big_s = asyncio.run(big_request(url))
                    rows.append(row(name, "one text during a 2048-text request", one, f"{big_s:.1f}"))
                    after = asyncio.run(abandoned(url, port))
                    rows.append(row(name, "one text after 30 abandoned 100-text requests", after, "-"))
                if "mixed" in loads:
                    alone, _ = asyncio.run(image_clients(url, args.seconds, 0))
                    mixed, lat = asyncio.run(image_clients(url, args.seconds, 1))
                    mixed_rows.append([name, f"{alone:.1f}", f"{mixed:.1f}", f"{mixed / alone - 1:+.0%}",
                                       len(lat), ms(lat, 50), ms(lat, 99)])  # fmt: skip
            finally:
                server.terminate()
                server.wait(timeout=30)
    if rows:
        print_table(
            f"clipsearch serve: head-of-line blocking, {args.model} (random weights), {os.cpu_count()} CPUs",
            ["server", "load", "one-text requests", "first ms", "p50 ms", "max ms", "big request s"],
            rows,
        )
    if mixed_rows:
        print_table(
            f"clipsearch serve: texts beside 8 clients of 8-image requests, {args.model}, {os.cpu_count()} CPUs, "
            f"{args.seconds:g} s each",
            ["server", "images/s alone", "images/s with texts", "change", "text queries", "text p50 ms",
             "text p99 ms"],
            mixed_rows,
        )  # fmt: skip


if __name__ == "__main__":
    main()
