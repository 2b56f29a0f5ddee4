"""Memory one hostile request can take from `clipsearch serve`: the server's peak RSS above its
resting RSS during each attack, for a server from ``--baseline`` (a git revision checked out into
a temporary worktree, run on the same virtual environment) and one from this tree, in one run.

- **gzip bomb URL**: ``{"input": [{"image": URL}]}`` where URL answers 1,829 bytes of gzip in
  gzip (1 GiB of zeros) as ``image/jpeg`` with ``Content-Encoding: gzip, gzip``;
- **20000x2 PNG**: a 207-byte strip as a data URI in ``/v1/embeddings``;
- **60 URLs of 15 MB**: one request over its image budget (128 MiB);
- **20 keyless bodies**: on a server with ``--api-key``, 20 connections without the key each
  send the first 31 MiB of a 32 MiB body and hold.

    python benchmarks/hostile.py [--baseline REV] [--model ViT-B-32]

The server runs ViT-B-32 with random weights (memory does not depend on the values) on the CPU,
with ``--allow-private-urls`` so that a local HTTP server can play the hostile host. RSS is
sampled every 20 ms with psutil (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import io
import os
import socket
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, print_table, random_checkpoint, run_server, source_trees

MIB = 1024 * 1024


def hostile_host() -> ThreadingHTTPServer:
    """/bomb: gzip in gzip of 1 GiB of zeros; /big/N: a 15 MB JPEG-typed body."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb") as z:
        zero = bytes(MIB)
        for _ in range(1024):
            z.write(zero)
    bomb = gzip.compress(out.getvalue(), compresslevel=9)
    big = b"\xff\xd8\xff" + bytes(15 * 1000 * 1000)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body, headers = (bomb, {"Content-Encoding": "gzip, gzip"}) if self.path == "/bomb" else (big, {})
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def strip_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (20000, 2), (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def peak_during(pid: int, attack) -> tuple[float, float, str]:
    """(resting RSS MiB, peak RSS above it MiB, what the attack got back)."""
    proc = psutil.Process(pid)
    rest = proc.memory_info().rss
    peak = rest
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        outcome = attack()
    finally:
        time.sleep(0.5)  # what the server still does after answering counts too
        done.set()
        sampler.join()
    return rest / MIB, (peak - rest) / MIB, f"{outcome} in {time.perf_counter() - started:.1f} s"


def keyless_bodies(port: int) -> str:
    socks = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 33554000\r\n\r\n"
        )
        socks.append(s)
    chunk = b" " * MIB
    refused = 0
    for s in socks:
        with contextlib.suppress(OSError):  # the server answered and closed before the body was sent
            for _ in range(31):
                s.sendall(chunk)
        s.settimeout(2.0)  # a server still waiting for the rest of the body does not answer
        with contextlib.suppress(OSError):
            refused += s.recv(12).startswith(b"HTTP/1.1 401")
    time.sleep(1.0)
    for s in socks:
        s.close()
    return f"{refused} of 20 answered 401"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="", help="git revision measured as 'before' ('' to skip)")
    parser.add_argument("--model", default="ViT-B-32")
    args = parser.parse_args()
    env = {**os.environ, "CLIPSEARCH_MODEL": args.model, "CLIPSEARCH_WEIGHTS": str(random_checkpoint(args.model))}
    host = hostile_host()
    origin = f"http://127.0.0.1:{host.server_address[1]}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp, source_trees(args.baseline, Path(tmp)) as trees:
        work = Path(tmp)
        try:
            for name, src in trees.items():
                attacks = {
                    "gzip bomb URL (1 GiB inside 2 KB)": {"input": [{"image": f"{origin}/bomb"}]},
                    "20000x2 PNG (207 bytes)": {"input": [{"image": strip_png()}]},
                    "60 URLs of 15 MB in one request": {"input": [{"image": f"{origin}/big/{i}"} for i in range(60)]},
                }
                for attack, body in attacks.items():
                    port = free_port()
                    server = run_server(src, env, work / f"{name}.db", port, "--allow-private-urls")
                    try:

                        def send(body: dict = body, port: int = port) -> str:
                            r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json=body, timeout=600)
                            return f"HTTP {r.status_code}"

                        rest, grown, outcome = peak_during(server.pid, send)
                        rows.append([name, attack, f"{rest:.0f}", f"+{grown:.0f}", outcome])
                    finally:
                        server.terminate()
                        server.wait(timeout=30)
                port = free_port()
                server = run_server(src, env, work / f"{name}.db", port, "--allow-private-urls", "--api-key", "sekrit")
                try:
                    rest, grown, outcome = peak_during(server.pid, lambda port=port: keyless_bodies(port))
                    rows.append([name, "20 keyless 31 MiB bodies (--api-key)", f"{rest:.0f}", f"+{grown:.0f}", outcome])
                finally:
                    server.terminate()
                    server.wait(timeout=30)
        finally:
            host.shutdown()
    print_table(
        f"clipsearch serve: peak RSS above rest during one hostile request, {args.model}, {os.cpu_count()} CPUs",
        ["server", "attack", "rest MiB", "peak MiB", "answer"],
        rows,
    )


if __name__ == "__main__":
    main()
