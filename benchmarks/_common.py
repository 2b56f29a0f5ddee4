"""Helpers shared by the benchmarks: random-init checkpoints of real architectures, test photos,
and percentile tables. Speed does not depend on weight values, so random weights measure it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
# the shared photos beside the checkout; CLIPSEARCH_BENCH_DATA names another copy (the GPU check carries one)
SHARED = Path(os.environ.get("CLIPSEARCH_BENCH_DATA") or HERE.parent.parent / "shared" / "data")
CACHE = Path(os.environ.get("CLIPSEARCH_BENCH_CACHE", Path.home() / ".cache" / "clipsearch-bench"))


def random_checkpoint(arch: str = "ViT-B-32") -> Path:
    """A checkpoint file of ``arch`` with random weights, written once and reused."""
    path = CACHE / f"{arch}-random.pt"
    if path.is_file():
        return path
    import torch

    from clipsearch._compat import import_open_clip

    open_clip = import_open_clip()
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return path


def photos(n: int, size: tuple[int, int] = (500, 375)) -> list[Path]:
    """``n`` real JPEG photos: the shared ImageNet sample when present (mostly ~500x375), else
    scikit-image's sample photos resized to ``size`` and written under the cache folder."""
    sample = SHARED / "imagenet-sample"
    if sample.is_dir():
        files = sorted(sample.glob("*.JPEG"))
        if files:
            return files[:n] + _variants(files, n - len(files))
    import skimage.data
    from PIL import Image

    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "hubble_deep_field"]
    folder = CACHE / f"photos-{size[0]}x{size[1]}"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        if not path.is_file():
            img = Image.fromarray(getattr(skimage.data, names[i % len(names)])()).convert("RGB").resize(size)
            # a little per-file variation, so no two files are identical
            arr = np.asarray(img, dtype=np.int16) + (i % 17) - 8
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
        out.append(path)
    return out


def _variants(files: list[Path], n: int) -> list[Path]:
    """``n`` more distinct photos past the sample's end (a repeated path would be ingested once):
    the sample's photos again, each round a little brighter. Written once, on every core."""
    from concurrent.futures import ProcessPoolExecutor

    if n <= 0:
        return []
    folder = CACHE / f"variants-of-{len(files)}-{files[0].parent.name}"  # another sample, other variants
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(files[i % len(files)], folder / f"{i:06d}.jpg", 1 + i // len(files)) for i in range(n)]
    missing = [job for job in jobs if not job[1].is_file()]
    if missing:
        with ProcessPoolExecutor() as pool:
            list(pool.map(_write_variant, missing, chunksize=16))
    return [job[1] for job in jobs]


def _write_variant(job: tuple[Path, Path, int]) -> None:
    from PIL import Image

    src, path, shift = job
    arr = np.asarray(Image.open(src).convert("RGB"), dtype=np.int16) + shift
    tmp = path.with_suffix(".tmp")
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(tmp, "JPEG", quality=90)
    tmp.replace(path)


def large_photos(n: int, size: tuple[int, int] = (3000, 2000), quality: int = 90) -> list[Path]:
    """``n`` big JPEGs like product and phone photos (3000x2000, about 1.4 MB): the photos of
    ``photos(n)`` upscaled, with a little sensor-like grain so they compress like real ones.
    Written once under the cache folder, on every core (a quarter of a second each)."""
    from concurrent.futures import ProcessPoolExecutor

    folder = CACHE / f"photos-{size[0]}x{size[1]}-q{quality}"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(i, src, folder / f"{i:05d}-{src.stem}.jpg", size, quality) for i, src in enumerate(photos(n))]
    missing = [job for job in jobs if not job[2].is_file()]
    if missing:
        with ProcessPoolExecutor() as pool:
            list(pool.map(_write_large, missing, chunksize=4))
    return [job[2] for job in jobs]


def _write_large(job: tuple[int, Path, Path, tuple[int, int], int]) -> None:
    from PIL import Image

    i, src, path, size, quality = job
    rng = np.random.default_rng(i)
    img = Image.open(src).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    grain = rng.normal(0, 4, (size[1], size[0], 1)).astype(np.int16)
    arr = np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    tmp = path.with_suffix(".tmp")
    Image.fromarray(arr).save(tmp, "JPEG", quality=quality)
    tmp.replace(path)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def print_table(title: str, headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until the server at ``url`` answers /health with 200 (its model is loaded)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise SystemExit("server did not become healthy")
        time.sleep(0.2)


@contextlib.contextmanager
def source_trees(baseline: str, work: Path) -> Iterator[dict[str, Path]]:
    """``{"before": src of revision ``baseline``, "after": this checkout's src}`` (only "after"
    without a baseline): the baseline is checked out into a temporary git worktree under
    ``work``, run on the same virtual environment, and removed on exit."""
    root = HERE.parent
    trees = {"after": root / "src"}
    worktree = work / "baseline"
    if baseline:
        subprocess.run(["git", "-C", str(root), "worktree", "add", "-q", "--detach", str(worktree), baseline])
        trees = {"before": worktree / "src", **trees}
    try:
        yield trees
    finally:
        if baseline:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(worktree)])


def open_as(src: Path, db: Path) -> None:
    """Let the clipsearch of ``src`` open ``db``, a store this tree may have migrated. Schema 9
    adds the live counts to the namespace rows: an older revision ignores them, and the version
    set back to 8 has this tree count them again when it opens the file next. Schema 8 adds the
    ``deleted`` table: with that table empty, schema 7 reads the file as its own."""
    import re
    import sqlite3
    import sys

    theirs = int(re.search(r"SCHEMA_VERSION = (\d+)", (src / "clipsearch/store/sqlite.py").read_text())[1])
    with sqlite3.connect(db) as conn:
        ours = int(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
        if theirs < ours:
            if theirs < 7 or (theirs == 7 and conn.execute("SELECT count(*) FROM deleted").fetchone()[0]):
                sys.exit(f"the baseline reads schema {theirs}, the store is schema {ours}")
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(theirs),))


_DROP = """
import os, sys
from pathlib import Path
db = Path(sys.argv[1])
for p in [*db.parent.glob(f"{db.name}*"), *db.parent.glob(f"{db.name}-index/*")]:
    if p.is_file():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
"""


def drop_from_page_cache(db: Path) -> None:
    """Drop a SQLite store's files (the database, its WAL, its index folder) from the page cache
    (posix_fadvise), as a kernel that pages out idle file pages leaves them: a process started
    after reads them from disk. Done by a child process: closing any descriptor of the database
    releases every POSIX lock this process holds on it, SQLite's included, and a connection still
    open here (a collection not yet collected) then goes on as though it held them; the next
    process to close its connection believes itself the last, checkpoints and deletes the
    write-ahead log under that one, and its later reads of the log fail (SQLITE_IOERR_SHORT_READ:
    what stopped two 10M runs in their deletes)."""
    import sys

    subprocess.run([sys.executable, "-c", _DROP, str(db)], check=True)


def live_in_order(conn: Any, seed: int) -> np.ndarray:
    """The numbers i of a kept store's live items (ids i0..i(N-1), rows numbered 1..N) in one
    fixed random order of all its rows, the deleted ones left out: runs one after another with the
    same seed each take the next ids not yet deleted."""
    n = conn.execute("SELECT max(seq) FROM items").fetchone()[0]
    gone = np.fromiter((r[0] for r in conn.execute("SELECT seq FROM deleted")), dtype=np.int64)
    order = np.random.default_rng(seed).permutation(np.arange(1, n + 1))
    return order[~np.isin(order, gone)] - 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(src: Path, env: dict, db: Path, port: int, *extra: str) -> subprocess.Popen:
    """``clipsearch serve`` from the source tree ``src`` on ``db`` and ``port`` (quiet, plus
    ``extra`` options), once its model is loaded."""
    import sys

    cmd = [sys.executable, "-m", "clipsearch.cli", "serve", "--db", str(db), "--port", str(port)]
    cmd += ["--log-level", "error", *extra]
    server = subprocess.Popen(cmd, env={**env, "PYTHONPATH": str(src)}, stderr=subprocess.DEVNULL)
    wait_healthy(f"http://127.0.0.1:{port}", server)
    return server
