"""Ingest throughput: the plain one-image-at-a-time loop vs `clipsearch ingest`, same files, one run.

For each image set (by default the ~500x375 photos of ../shared/data/imagenet-sample, and the
same photos re-encoded at 3000x2000, ~1.4 MB each, generated once), it runs:

- the plain loop people write: PIL open, full decode, open_clip's own preprocess, encode one
  image at a time with the PyTorch model (on the first --plain images only: it is slow);
- `clipsearch ingest` with --runtime torch (fp32), --runtime onnx (fp32) and --runtime onnx
  --precision int8, each into a fresh database;

and prints images/s (model loading excluded, as `ingest` reports it), the ratio to the plain
loop, the peak memory of the whole process tree, and the cosine of each runtime's vectors to
PyTorch fp32's for the same files.

    python benchmarks/ingest.py [--images DIR] [--count 300] [--plain 60] [--model ViT-B-32]

Needs the bench extra (`pip install -e '.[bench]'`). Every run is a subprocess, one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, large_photos, photos, print_table, random_checkpoint

RUNTIMES = {
    "torch fp32": [],
    "onnx fp32": ["--runtime", "onnx"],
    "onnx int8": ["--runtime", "onnx", "--precision", "int8"],
}


def plain_loop(listing: Path, model_name: str, weights: Path) -> dict:
    """The baseline, in this process: what a first script does."""
    import torch
    from PIL import Image

    from clipsearch._compat import import_open_clip

    open_clip = import_open_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(weights))
    model.eval()
    files = listing.read_text().split()
    started = time.perf_counter()
    with torch.no_grad():
        for f in files:
            image = Image.open(f).convert("RGB")
            model.encode_image(preprocess(image).unsqueeze(0))
    return {"embedded": len(files), "seconds": time.perf_counter() - started}


class PeakMemory:
    """Samples the resident memory of a process and all its children."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            self._stop.wait(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_measured(cmd: list[str], env: dict) -> tuple[dict, int]:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    memory = PeakMemory(proc.pid)
    out, _ = proc.communicate()
    peak = memory.stop()
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return json.loads(out), peak


def vectors(db: Path) -> dict[str, np.ndarray]:
    from clipsearch.store import open_store

    store = open_store(str(db))
    try:
        out: dict[str, np.ndarray] = {}
        for items, matrix in store.iter_vectors("default"):
            out.update((item.id, row) for item, row in zip(items, matrix, strict=True))
        return out
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, help="a folder of images (default: the two sets above)")
    ap.add_argument("--count", type=int, default=300, help="images per set")
    ap.add_argument("--plain", type=int, default=60, help="images for the plain loop (it is slow)")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated: " + ", ".join(RUNTIMES))
    ap.add_argument("--sets", default="small,large", help="of the default sets: small (the photos), large (3000x2000)")
    ap.add_argument("--ingest-args", default="", help="extra flags for every `clipsearch ingest`")
    ap.add_argument("--plain-loop", type=Path, help=argparse.SUPPRESS)  # internal: run the baseline
    args = ap.parse_args()
    weights = random_checkpoint(args.model)
    if args.plain_loop:
        print(json.dumps(plain_loop(args.plain_loop, args.model, weights)))
        return

    if args.images:
        sets = {str(args.images): sorted(p for p in args.images.rglob("*") if p.is_file())[: args.count]}
    else:
        small = photos(args.count)
        where = "imagenet-sample" if (SHARED / "imagenet-sample").is_dir() else "generated"
        sets = {}
        if "small" in args.sets:
            sets[f"{where} (~500x375)"] = small
        if "large" in args.sets:
            sets["3000x2000 re-encodes (~1.4 MB)"] = large_photos(args.count)

    env = {**os.environ, "CLIPSEARCH_MODEL": args.model, "CLIPSEARCH_WEIGHTS": str(weights)}
    exe = [sys.executable, "-m", "clipsearch.cli"]
    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-ingest-") as work:
        tmp = Path(work)
        rows = []
        for set_name, files in sets.items():
            listing = tmp / "list.txt"
            listing.write_text("".join(f"{f}\n" for f in files))
            plain_list = tmp / "plain.txt"
            plain_list.write_text("".join(f"{f}\n" for f in files[: args.plain]))
            base, peak = run_measured([sys.executable, __file__, "--plain-loop", str(plain_list)], env)
            base_rate = base["embedded"] / base["seconds"]
            rows.append(
                [
                    set_name,
                    "plain loop (torch, 1 at a time)",
                    base["embedded"],
                    f"{base_rate:.1f}",
                    "1.0x",
                    f"{peak / 2**20:.0f}",
                    "-",
                ]
            )
            reference: dict[str, np.ndarray] | None = None
            for name in args.runtimes.split(","):
                name = name.strip()
                db = tmp / f"{name.replace(' ', '-')}-{len(rows)}.db"
                cmd = [*exe, "ingest", f"image-list:{listing}", "--db", str(db), "--json", *RUNTIMES[name]]
                report, peak = run_measured(cmd + args.ingest_args.split(), env)
                rate = report["embedded"] / report["seconds"]
                got = vectors(db)
                if reference is None and name == "torch fp32":
                    reference, cosine = got, "1 (reference)"
                elif reference is not None:
                    common = sorted(set(got) & set(reference))
                    cos = np.array([float(got[k] @ reference[k]) for k in common])
                    cosine = f"min {cos.min():.5f}"
                else:
                    cosine = "-"
                rows.append(
                    [
                        set_name,
                        f"clipsearch ingest, {name}",
                        report["embedded"],
                        f"{rate:.1f}",
                        f"{rate / base_rate:.1f}x",
                        f"{peak / 2**20:.0f}",
                        cosine,
                    ]
                )
        print_table(
            f"ingest: {args.model} (random weights), {os.cpu_count()} CPUs",
            ["images", "pipeline", "n", "images/s", "vs plain", "peak MiB", "cosine to torch fp32"],
            rows,
        )


if __name__ == "__main__":
    main()
