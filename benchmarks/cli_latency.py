"""Cold command latency and memory: what one ``clipsearch`` command costs a user, from the shell
prompt to the answer, before and after the query path that loads only what a query needs.

Each command runs as a fresh process (the model loaded from disk, nothing warm but the OS file
cache); wall time is the median of ``--repeat`` runs and memory the largest peak RSS of the
process (``wait4``). "before" runs the same commands with the source tree of ``--baseline``
(a git revision, checked out into a temporary worktree) on the same virtual environment and a
store ingested by that version; "after" runs this checkout. Both use a random-init ViT-B-32
(speed does not depend on weight values) and the same photos.

    python benchmarks/cli_latency.py                      # 300 photos, baseline e9f7492
    python benchmarks/cli_latency.py --n 100 --repeat 3 --baseline HEAD~5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import CACHE, photos, print_table, source_trees

# The command runs as ``python -m clipsearch.cli``, and writes its own peak RSS when it exits.
# VmHWM is the new process image's own high-water mark; getrusage's ru_maxrss would also count
# the pages of the benchmark process it was forked from.
_WRAPPER = """
import runpy, sys
peak_file = sys.argv[1]
sys.argv = ["clipsearch", *sys.argv[2:]]
try:
    runpy.run_module("clipsearch.cli", run_name="__main__")
finally:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(peak_file, "w").write(line.split()[1])
"""


def run(src: Path, args: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS in MB, exit code, stderr) of one cold command."""
    env = dict(env, PYTHONPATH=str(src))
    with tempfile.NamedTemporaryFile(suffix=".peak") as peak_file:
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", _WRAPPER, peak_file.name, *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wall = time.perf_counter() - started
        peak_kb = float(Path(peak_file.name).read_text() or 0)
    return wall, peak_kb / 1024, proc.returncode, proc.stderr.decode(errors="replace")


def measure(src: Path, args: list[str], env: dict[str, str], repeat: int) -> tuple[float, float]:
    walls, peaks = [], []
    for _ in range(repeat):
        wall, peak, code, stderr = run(src, args, env)
        if code != 0:
            raise SystemExit(f"{' '.join(args)} failed ({code}): {stderr.strip()[-500:]}")
        walls.append(wall)
        peaks.append(peak)
    return statistics.median(walls), max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="photos in the store")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", default="e9f7492", help="git revision measured as 'before' ('' to skip)")
    args = parser.parse_args()

    # in a child process, so that this one never holds torch (and stays small)
    code = "from _common import random_checkpoint; print(random_checkpoint('ViT-B-32'))"
    made = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent)
    weights = Path(made.stdout.strip().splitlines()[-1])
    folder = CACHE / f"cli-latency-photos-{args.n}"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for i, p in enumerate(photos(args.n)):
            shutil.copy(p, folder / f"{i:05d}{p.suffix}")
    query_image = sorted(folder.iterdir())[0]
    model = ["--model", "ViT-B-32", "--pretrained", "openai", "--weights", str(weights)]

    work = Path(tempfile.mkdtemp(prefix="clipsearch-cli-latency-"))
    env = dict(os.environ, CLIPSEARCH_ONNX_CACHE=str(work / "onnx"), PYTHONUNBUFFERED="1")
    commands = {
        'search "a dog on a beach"': ["search", "a dog on a beach"],
        "search --image PHOTO": ["search", "--image", str(query_image)],
        "info": ["info"],
        'search "dog" --mode keyword': ["search", "dog", "--mode", "keyword"],
    }
    results: dict[str, dict[str, tuple[float, float]]] = {}
    try:
        with source_trees(args.baseline, work) as trees:
            for label, src in trees.items():
                db = work / f"{label}.db"
                started = time.perf_counter()
                wall, _, code, stderr = run(src, ["ingest", str(folder), "--db", str(db), *model], env)
                if code != 0:
                    raise SystemExit(f"ingest ({label}) failed: {stderr[-500:]}")
                print(f"{label}: ingested {args.n} photos in {time.perf_counter() - started:.1f} s", flush=True)
                # the first query of a model exports its ONNX towers once; it is reported, not timed below
                wall, peak, _, _ = run(src, ["search", "warm up", "--db", str(db)], env)
                print(f"{label}: first query {wall:.1f} s, {peak:.0f} MB (after: exports the towers once)", flush=True)
                for name, argv in commands.items():
                    results.setdefault(name, {})[label] = measure(src, [*argv, "--db", str(db)], env, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for name, by in results.items():
        row: list[object] = [name]
        if "before" in by:
            row += [f"{by['before'][0]:.2f}", f"{by['before'][1]:.0f}"]
        row += [f"{by['after'][0]:.2f}", f"{by['after'][1]:.0f}"]
        if "before" in by:
            row.append(f"{by['before'][0] / by['after'][0]:.1f}x")
        rows.append(row)
    headers = ["command (cold, fresh process)"]
    if "before" in trees:
        headers += ["before s", "before MB"]
    headers += ["after s", "after MB"]
    if "before" in trees:
        headers.append("speed-up")
    cpu = os.cpu_count()
    print_table(
        f"Cold CLI latency, {args.n} photos, ViT-B-32 (random weights), {cpu} cores, median of {args.repeat}",
        headers,
        rows,
    )


if __name__ == "__main__":
    main()
