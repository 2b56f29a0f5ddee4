"""How fast the disk under a store is today: random 4 KB reads a second at 1, 8 and 32 reads at
once, and sequential reads of 8 MB, from a large file dropped from the page cache first.

A delete's id lookups are random page reads (or, through the id map, one sequential read) and a
cold search reads the fp16 file's rows at random: their figures in docs/speed.md move with these
(this machine's disk served 15,000-31,000 random reads a second on fast days and far fewer on slow
ones). Run it beside a benchmark to say which kind of day it ran on.

    python benchmarks/disk.py FILE [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table

PAGE = 4096
SEQUENTIAL = 8 << 20


def drop(fd: int) -> None:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def random_reads(fd: int, size: int, at_once: int, seconds: float, seed: int) -> float:
    """Random page reads a second, ``at_once`` threads each reading one page at a time (os.pread
    lets go of the GIL): pages drawn anew, so that few repeat in the page cache."""
    pages = size // PAGE
    offsets = np.random.default_rng(seed).integers(0, pages, 4_000_000) * PAGE
    done = [0] * at_once
    stop = time.perf_counter() + seconds

    def reader(k: int) -> None:
        for i in range(k, len(offsets), at_once):
            os.pread(fd, PAGE, int(offsets[i]))
            done[k] += 1
            if done[k] % 64 == 0 and time.perf_counter() > stop:
                return

    started = time.perf_counter()
    with ThreadPoolExecutor(at_once) as pool:
        list(pool.map(reader, range(at_once)))
    return sum(done) / (time.perf_counter() - started)


def sequential(fd: int, size: int, seconds: float) -> float:
    """Bytes a second read from the start in reads of 8 MB."""
    buf = bytearray(SEQUENTIAL)
    view = memoryview(buf)
    read, started = 0, time.perf_counter()
    while read < size and time.perf_counter() - started < seconds:
        got = os.preadv(fd, [view], read)
        if not got:
            break
        read += got
    return read / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", type=Path, help="a large file on the disk to measure (a store's database: only read)")
    ap.add_argument("--seconds", type=float, default=5.0, help="time each measure runs")
    args = ap.parse_args()
    fd = os.open(args.file, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < 1 << 30:
            raise SystemExit(
                f"{args.file} is {size >> 20} MB: give a file of a gigabyte or more (the page cache hides less)"
            )
        rows = []
        for seed, at_once in enumerate((1, 8, 32)):
            drop(fd)
            rows.append(
                [
                    f"random 4 KB, {at_once} at once",
                    f"{random_reads(fd, size, at_once, args.seconds, seed):,.0f} reads/s",
                ]
            )
        drop(fd)
        rows.append(["sequential, 8 MB reads", f"{sequential(fd, size, args.seconds) / 1e9:.2f} GB/s"])
        drop(fd)
    finally:
        os.close(fd)
    print_table(
        f"Disk under {args.file} ({size / 1e9:.1f} GB, dropped from the page cache before each)", ["read", "rate"], rows
    )


if __name__ == "__main__":
    main()
