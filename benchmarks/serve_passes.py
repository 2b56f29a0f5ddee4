"""Unfiltered queries at catalog scale, beside an earlier revision: a new serving process on a
store that ``benchmarks/scale.py --keep`` (or ``--import-only`` and ``clipsearch index build``)
left, its first pass over the queries and the passes after it.

    python benchmarks/serve_passes.py --reuse DIR [--baseline REV] [--lock] [--cold] [--idle 120]
                                      [--passes 3] [--rounds 2]

Each side (``--baseline``, a git revision checked out into a temporary worktree and run on this
virtual environment, then this tree; ``--rounds``: in turn that many times) opens the store in a
new process, answers the first query, and asks all the queries ``--passes`` times. ``--cold``
drops the store's files from the page cache first (posix_fadvise), as a kernel that pages out
idle file pages leaves them: the first pass then reads its re-ranked rows from disk, and the
passes after it find them in the page cache and mapped. ``--lock`` adds a side: this tree with
``CLIPSEARCH_LOCK_VECTORS=1``: the first search starts locking the vectors file in memory and
answers meanwhile; the process then waits until they are locked, as ``serve`` does before it
says it is healthy, and that time is the "ready" column. ``--idle S``: each process waits S
seconds before every pass after the first, as a server does between its busy hours (this
machine's kernel pages out file pages idle for a minute). Recall@10 is against the exact answers ``scale.py`` saved.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import drop_from_page_cache, open_as, pct, print_table, source_trees
from scale import recall

SERVE = r"""
import json, os, sys, time
from pathlib import Path
import numpy as np
work, passes, idle = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
queries = np.load(work / "queries.npy").astype(np.float32)
started = time.perf_counter()
import clipsearch
c = clipsearch.open(work / "scale.db", create=False)
c.search(vector=queries[0], limit=10)
out = {"first": time.perf_counter() - started, "passes": []}
if os.environ.get("CLIPSEARCH_LOCK_VECTORS"):  # as `serve` does before it says it is healthy
    c.store.keep_resident(c.namespace)
out["ready"] = time.perf_counter() - started
for number in range(passes):
    if number:
        time.sleep(idle)
    times, ids = [], []
    for q in queries:
        t = time.perf_counter()
        hits = c.search(vector=q, limit=10)
        times.append(time.perf_counter() - t)
        ids.append([int(h.id[1:]) for h in hits])
    out["passes"].append({"times": times, "ids": ids})
status = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith(("RssAnon", "VmLck")))
out["rss_anon"] = int(status["RssAnon"].split()[0]) * 1024
out["locked"] = int(status["VmLck"].split()[0]) * 1024
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", required=True, help="the folder scale.py kept (holds scale.db, queries.npy, truth.pkl)")
    ap.add_argument("--baseline", default="", help="a git revision to run beside this tree")
    ap.add_argument("--passes", type=int, default=3, help="passes over the queries in each process")
    ap.add_argument("--rounds", type=int, default=1, help="processes of each side, in turn")
    ap.add_argument(
        "--cold", action="store_true", help="drop the store's files from the page cache before each process"
    )
    ap.add_argument("--lock", action="store_true", help="add a side: this tree with CLIPSEARCH_LOCK_VECTORS=1")
    ap.add_argument("--idle", type=float, default=0.0, help="seconds idle before every pass after the first")
    args = ap.parse_args()
    work = Path(args.reuse)
    with (work / "truth.pkl").open("rb") as f:
        truth = pickle.load(f)[""]
    with (work / "filters.pkl").open("rb") as f:
        kinds = pickle.load(f)["kinds"]
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp, source_trees(args.baseline, Path(tmp)) as trees:
        sides = [(side, src, {}) for side, src in trees.items()]
        if args.lock:
            sides.append(("locked", trees["after"], {"CLIPSEARCH_LOCK_VECTORS": "1"}))
        for side, src, extra in sides * args.rounds:
            if side == "before":
                open_as(src, work / "scale.db")
            env = {**os.environ, "PYTHONPATH": str(src), **extra}
            if args.cold:
                drop_from_page_cache(work / "scale.db")
            done = subprocess.run(
                [sys.executable, "-c", SERVE, str(work), str(args.passes), str(args.idle)],
                env=env,
                capture_output=True,
                text=True,
            )
            if done.returncode:
                sys.exit(done.stderr)
            out = json.loads(done.stdout.strip().splitlines()[-1])
            for number, p in enumerate(out["passes"]):
                found = []
                for kind in ("text", "image"):
                    sel = [i for i, k in enumerate(kinds) if k == kind]
                    found.append(f"{recall([p['ids'][i] for i in sel], [truth[i] for i in sel]):.3f}")
                rows.append([
                    side if number == 0 else "",
                    f"{out['first']:.2f} / {out['ready']:.2f} s" if number == 0 else "",
                    f"{out['rss_anon'] / 1e9:.2f} / {out['locked'] / 1e9:.2f} GB" if number == 0 else "",
                    number + 1,
                    f"{pct(p['times'], 50) * 1e3:.1f}",
                    f"{pct(p['times'], 99) * 1e3:.1f}",
                    " / ".join(found),
                ])  # fmt: skip
    print_table(
        "Unfiltered queries, new serving processes"
        + (" (store out of the page cache before each)" if args.cold else "")
        + (f", {args.idle:g} s idle before each pass after the first" if args.idle else ""),
        ["side", "first answer / ready", "RssAnon / VmLck", "pass", "p50 (ms)", "p99 (ms)", "recall@10 text / image"],
        rows,
    )


if __name__ == "__main__":
    main()
