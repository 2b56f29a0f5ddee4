"""Local ingest vs ingest through Ray on this machine, same files, one run each: the cost of Ray
on a single node (scheduling, object transfer between the decode tasks and the encoder actor,
results back to the driver for SQLite).

    python benchmarks/ray_ingest.py [--count 300] [--actors 1] [--batch-size 32]

ViT-B-32 with random weights, PyTorch fp32 on the CPU; images/s as `ingest` reports them (model
loading and, for Ray, starting the local cluster excluded; the actor's model load is included).
Needs the ray extra (`pip install -e '.[bench,ray]'`).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import photos, print_table, random_checkpoint


def ingest(listing: Path, db: Path, weights: Path, *extra: str) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "clipsearch.cli", "ingest", f"image-list:{listing}", "--db", str(db)]
    cmd += ["--weights", str(weights), "--json", *extra]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CLIPSEARCH_DEVICE": "cpu"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"ingest failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    weights = random_checkpoint("ViT-B-32")
    files = photos(args.count)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "list.txt"
        listing.write_text("".join(f"{f}\n" for f in files))
        runs = [
            ("local ingest", []),
            (f"--ray local, {args.actors} actor(s)", ["--ray", "local", "--actors", str(args.actors)]),
        ]
        base = None
        for label, extra in runs:
            report, wall = ingest(
                listing, Path(tmp) / f"{len(rows)}.db", weights, "--batch-size", str(args.batch_size), *extra
            )
            rate = report["embedded"] / report["seconds"]
            base = base or rate
            rows.append([label, str(report["embedded"]), f"{rate:.1f}", f"{rate / base:.2f}x", f"{wall:.1f}"])
    print_table(
        f"Local vs Ray ingest, ViT-B-32 torch fp32, {os.cpu_count()} cores, {args.count} photos",
        ["run", "images", "images/s", "vs local", "wall s (whole command)"],
        rows,
    )


if __name__ == "__main__":
    main()
