"""clipsearch's torch-free core beside rclip, as a user installs and runs them: venv size and
install time (pip's defaults, no local wheel folder), ``--help``, a whole-process ingest of N
photos into a fresh store, an ingest of one new photo (a fresh store), a cold text query (a new
process, the store already made), and the zero-step flow: a cold query that first brings the
folder up to date (``search --in DIR``; rclip's default query, which indexes the current
folder), with nothing changed.

Both run the same network: a random-init open_clip ViT-B-32-256 (rclip's architecture; speed
does not depend on weight values), exported once by this checkout's dev venv. clipsearch gets
it as a tower folder (``clipsearch models export``); rclip as the two ONNX files it downloads
from its hub repository, placed where it looks for them (``RCLIP_DATADIR``), since the hub
can't be reached here. Also, in the dev venv: how long the first query after an ingest on the
torch runtime takes (the query towers are exported by the ingest).

    python benchmarks/vs_rclip.py                 # 100 photos, 5 runs of each timed command
    python benchmarks/vs_rclip.py --n 300 --repeat 3
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

from _common import CACHE, photos, print_table, random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
ARCH = "ViT-B-32-256"
RCLIP_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"  # where rclip 3.x looks for its towers


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def timed_pair(ours: list[str], theirs: list[str], repeat: int, ours_kw: dict, theirs_kw: dict) -> tuple[float, float]:
    """Median wall seconds of two commands run alternately, ``repeat`` times each: whatever else
    the machine does meanwhile falls on both alike."""
    a, b = [], []
    for _ in range(repeat):
        for cmd, kw, times in ((ours, ours_kw, a), (theirs, theirs_kw, b)):
            start = time.perf_counter()
            sh(cmd, **kw)
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def timed(cmd: list[str], repeat: int, **kw) -> float:
    """Median wall seconds of ``cmd`` run ``repeat`` times."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        sh(cmd, **kw)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def venv(path: Path, *packages: str) -> float:
    """A clean venv with ``packages`` installed with pip's defaults; returns the seconds taken."""
    env = {**os.environ, "PIP_CONFIG_FILE": "/dev/null", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    start = time.perf_counter()
    sh([sys.executable, "-m", "venv", str(path)])
    sh([str(path / "bin" / "pip"), "install", "--quiet", *packages], env=env)
    return time.perf_counter() - start


def size_mb(path: Path) -> int:
    return int(sh(["du", "-sm", str(path)]).stdout.split()[0])


def rclip_model(towers: Path, datadir: Path) -> None:
    """Our export, as rclip's files: one ONNX file per tower, the input named "input"."""
    import onnx

    from clipsearch._compat import import_open_clip

    oc_tokenizer = import_open_clip().tokenizer

    out = datadir / RCLIP_SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    for src, dst in (("visual/model.onnx", "visual.onnx"), ("textual/model.onnx", "textual.onnx")):
        model = onnx.load(str(towers / src))
        old = model.graph.input[0].name
        model.graph.input[0].name = "input"
        for node in model.graph.node:
            node.input[:] = ["input" if name == old else name for name in node.input]
        onnx.save(model, str(out / dst))
    (datadir / "tokenizer").mkdir(exist_ok=True)
    vocab = Path(oc_tokenizer.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    shutil.copy(vocab, datadir / "tokenizer" / vocab.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="photos to ingest")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rclip", default="rclip", help="pip requirement for rclip")
    parser.add_argument("--part", choices=["all", "rclip", "first-query"], default="all", help="run one table only")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vs-rclip-"))
    dev = ROOT / ".venv" / "bin"
    try:
        checkpoint = random_checkpoint(ARCH)
        towers = CACHE / f"{ARCH}-towers"
        if not towers.is_dir():
            sh([str(dev / "clipsearch"), "models", "export", ARCH, "--weights", str(checkpoint), "--out", str(towers)])
        folder = work / "photos"
        folder.mkdir()
        for i, src in enumerate(photos(args.n)):
            shutil.copy(src, folder / f"{i:05d}{src.suffix}")

        if args.part != "first-query":
            beside_rclip(args, work, towers, folder)
        if args.part != "rclip":
            first_query(args, work, checkpoint, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def beside_rclip(args: argparse.Namespace, work: Path, towers: Path, folder: Path) -> None:
    """The core wheel and rclip, each in a clean venv, on the same network and photos."""
    dev = ROOT / ".venv" / "bin"
    wheel_dir = work / "dist"
    sh([str(dev / "python"), "-m", "build", "--wheel", "--outdir", str(wheel_dir), str(ROOT)])
    wheel = next(wheel_dir.glob("clipsearch-*.whl"))
    rclip_data = work / "rclip-data"
    rclip_model(towers, rclip_data)
    rows = []
    # -- install
    ours, theirs = work / "clipsearch-venv", work / "rclip-venv"
    t_ours = venv(ours, str(wheel))
    t_theirs = venv(theirs, args.rclip)
    version = sh([str(theirs / "bin" / "pip"), "show", "rclip"]).stdout.split("Version: ")[1].split()[0]
    rows.append(["install (pip's defaults)", f"{t_ours:.0f} s", f"{t_theirs:.0f} s"])
    rows.append(["venv size", f"{size_mb(ours)} MB", f"{size_mb(theirs)} MB"])
    # -- --help
    h_ours, h_theirs = timed_pair(
        [str(ours / "bin" / "clipsearch"), "--help"], [str(theirs / "bin" / "rclip"), "--help"], args.repeat, {}, {}
    )
    rows.append(["--help", f"{h_ours:.2f} s", f"{h_theirs:.2f} s"])

    # -- ingest N photos, whole process, fresh store
    env_theirs = {**os.environ, "RCLIP_DATADIR": str(rclip_data), "HF_HUB_OFFLINE": "1"}
    env_ours = {**os.environ, "CLIPSEARCH_ONNX_CACHE": str(work / "onnx"), "HF_HUB_OFFLINE": "1"}
    db = work / "c.db"
    start = time.perf_counter()
    sh(
        [str(ours / "bin" / "clipsearch"), "ingest", str(folder), "--db", str(db), "--weights", str(towers)],
        env=env_ours,
    )
    i_ours = time.perf_counter() - start
    start = time.perf_counter()
    # rclip indexes the current folder, then answers the query
    sh([str(theirs / "bin" / "rclip"), "-t", "1", "a dog"], env=env_theirs, cwd=folder)
    i_theirs = time.perf_counter() - start
    rows.append([f"ingest {args.n} photos (+ rclip's query)", f"{i_ours:.1f} s", f"{i_theirs:.1f} s"])

    # -- one new photo, whole process, fresh store each time: the start-up is the whole cost
    one = work / "one"
    one.mkdir()
    shutil.copy(next(folder.iterdir()), one)
    o_times, t_times = [], []
    for i in range(args.repeat):
        one_db = work / f"one-{i}" / "c.db"  # a fresh store each time: its folder holds its index too
        one_db.parent.mkdir()
        rclip_one = work / f"rclip-one-{i}"  # rclip's towers, without its database
        shutil.copytree(rclip_data, rclip_one, ignore=shutil.ignore_patterns("db.sqlite3*"))
        for cmd, kw, times in (
            ([str(ours / "bin" / "clipsearch"), "ingest", str(one), "--db", str(one_db), "--weights", str(towers)],
             {"env": env_ours}, o_times),
            ([str(theirs / "bin" / "rclip"), "-t", "1", "a dog"],
             {"env": {**env_theirs, "RCLIP_DATADIR": str(rclip_one)}, "cwd": one}, t_times),
        ):  # fmt: skip
            start = time.perf_counter()
            sh(cmd, **kw)
            times.append(time.perf_counter() - start)
    rows.append(
        [
            "ingest 1 new photo (+ rclip's query), fresh store",
            f"{statistics.median(o_times):.2f} s",
            f"{statistics.median(t_times):.2f} s",
        ]
    )

    # -- a cold text query in a new process
    q_ours, q_theirs = timed_pair(
        [str(ours / "bin" / "clipsearch"), "search", "a dog", "--db", str(db), "--limit", "1"],
        [str(theirs / "bin" / "rclip"), "--no-indexing", "-t", "1", "a dog"],
        args.repeat,
        {"env": env_ours},
        {"env": env_theirs, "cwd": folder},
    )
    rows.append(["cold text query", f"{q_ours:.2f} s", f"{q_theirs:.2f} s"])

    # -- the zero-step flow: a query that first brings the folder up to date (nothing changed)
    env_in = {**env_ours, "XDG_DATA_HOME": str(work / "xdg"), "CLIPSEARCH_WEIGHTS": str(towers)}
    search_in = [str(ours / "bin" / "clipsearch"), "search", "a dog", "--in", str(folder), "--limit", "1"]
    sh(search_in, env=env_in)  # the per-user database's first run: the ingest
    z_ours, z_theirs = timed_pair(
        search_in,
        [str(theirs / "bin" / "rclip"), "-t", "1", "a dog"],
        args.repeat,
        {"env": env_in},
        {"env": env_theirs, "cwd": folder},
    )
    rows.append(
        ["cold query that first updates the folder (search --in; rclip)", f"{z_ours:.2f} s", f"{z_theirs:.2f} s"]
    )
    print_table(
        f"clipsearch (core wheel, no torch) beside rclip {version}: {ARCH} random-init, {args.n} photos, "
        f"median of {args.repeat}",
        ["", "clipsearch", "rclip"],
        rows,
    )


def first_query(args: argparse.Namespace, work: Path, checkpoint: Path, folder: Path) -> None:
    """The torch runtime: the first query after an ingest (the ingest exported the towers), then
    the median of the next ``--repeat``."""
    dev = ROOT / ".venv" / "bin"
    env_dev = {**os.environ, "CLIPSEARCH_ONNX_CACHE": str(work / "onnx-dev"), "HF_HUB_OFFLINE": "1"}
    dev_db = work / "t.db"
    model = ["--model", ARCH, "--weights", str(checkpoint)]
    start = time.perf_counter()
    sh([str(dev / "clipsearch"), "ingest", str(folder), "--db", str(dev_db), "--runtime", "torch", *model], env=env_dev)
    ingest_torch = time.perf_counter() - start
    query = [str(dev / "clipsearch"), "search", "a dog", "--db", str(dev_db), "--limit", "1"]
    first = timed(query, 1, env=env_dev)
    later = timed(query, args.repeat, env=env_dev)
    print_table(
        "dev venv (torch extra): ingest on the torch runtime, then queries (new processes)",
        ["step", "wall"],
        [
            [f"ingest {args.n} photos, --runtime torch (exports the query towers)", f"{ingest_torch:.1f} s"],
            ["first text query after it", f"{first:.2f} s"],
            [f"the next text queries (median of {args.repeat})", f"{later:.2f} s"],
        ],
    )


if __name__ == "__main__":
    main()
