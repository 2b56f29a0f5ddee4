"""``clipsearch watch`` and ``serve --watch`` (the photo-library issue, point 4): a real watcher
process on a temporary folder, with files added (one of them written slowly, as a copy in
progress), renamed, deleted, the folder removed and re-created, a burst of 1,000 files, and
SIGTERM in the middle of a batch."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

import clipsearch
from clipsearch.encoders import ModelSpec, load_encoder
from clipsearch.server import ServerSettings, create_app

from ..conftest import RunningServer, write_photos


class WatchProcess:
    """``clipsearch watch --json`` in its own process; ``next_event`` reads its lines."""

    def __init__(self, folder: Path, db: Path, weights: Path, *extra: str):
        cmd = [sys.executable, "-m", "clipsearch.cli", "watch", str(folder), "--db", str(db), "--json"]
        cmd += ["--weights", str(weights), "--quiet-ms", "300", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.put(json.loads(line))

    def next_event(self, timeout: float = 60) -> dict:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"no event in {timeout} s; stderr: {self.proc.stderr.read()}") from None  # type: ignore[union-attr]

    def until(self, test, timeout: float = 90) -> list[dict]:
        """Events up to and including the first that passes ``test``."""
        seen, deadline = [], time.monotonic() + timeout
        while True:
            seen.append(self.next_event(max(0.1, deadline - time.monotonic())))
            if test(seen[-1]):
                return seen

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=120)
        return code, self.proc.stderr.read()  # type: ignore[union-attr]


def _paths(db: Path) -> set[str]:
    with clipsearch.open(db) as col:
        return {it.metadata["path"] for items, _ in col.store.iter_vectors("default") for it in items}


def _count(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        return conn.execute("SELECT count(*) FROM items").fetchone()[0]


def _vector_of(db: Path, path: Path) -> np.ndarray:
    with clipsearch.open(db) as col:
        for items, vectors in col.store.iter_vectors("default"):
            for item, vector in zip(items, vectors, strict=True):
                if item.metadata["path"] == str(path):
                    return vector
    raise AssertionError(f"{path} is not stored")


def test_watch_follows_a_folder(tmp_path, tiny_openclip):
    folder, db = tmp_path / "library", tmp_path / "w.db"
    photos = write_photos(folder, ["astronaut", "chelsea"])
    watcher = WatchProcess(folder, db, tiny_openclip)
    try:
        first = watcher.next_event()
        assert (first["event"], first["embedded"]) == ("sync", 2)

        # a copy in progress: half the bytes, a pause shorter than the quiet time, the rest
        write_photos(tmp_path / "src", ["coffee"])
        data = (tmp_path / "src" / "coffee.jpg").read_bytes()
        with open(folder / "coffee.jpg", "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(0.15)
            f.write(data[len(data) // 2 :])
        event = watcher.until(lambda e: e["embedded"] or e["failed"])[-1]
        assert (event["embedded"], event["failed"]) == (1, 0)

        moved_vector = _vector_of(db, photos[1])
        (folder / "cats").mkdir()
        photos[1].rename(folder / "cats" / "kitty.jpg")
        event = watcher.until(lambda e: e["moved"] or e["removed"])[-1]
        assert (event["moved"], event["removed"], event["embedded"]) == (1, 0, 0)
        np.testing.assert_array_equal(_vector_of(db, folder / "cats" / "kitty.jpg"), moved_vector)

        photos[0].unlink()
        event = watcher.until(lambda e: e["removed"])[-1]
        assert event["removed"] == 1
        assert _paths(db) == {str(folder / "coffee.jpg"), str(folder / "cats" / "kitty.jpg")}

        # the folder goes, and comes back with other photos: watching resumes
        for p in sorted(folder.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        folder.rmdir()
        waiting = watcher.until(lambda e: e["event"] == "waiting")[-1]
        assert waiting["missing"] == [str(folder)]
        write_photos(folder, ["rocket"])
        event = watcher.until(lambda e: e["event"] == "sync")[-1]
        assert (event["embedded"], event["removed"]) == (1, 2)
        write_photos(folder, ["colorwheel"])
        assert watcher.until(lambda e: e["embedded"])[-1]["embedded"] == 1
        assert _paths(db) == {str(folder / "rocket.jpg"), str(folder / "colorwheel.jpg")}
    finally:
        code, err = watcher.stop()
    assert code == 0 and "stopped" in err, err


def test_a_burst_of_1000_files_and_sigterm_mid_batch(tmp_path, tiny_openclip):
    folder, db = tmp_path / "burst", tmp_path / "b.db"
    folder.mkdir()
    watcher = WatchProcess(folder, db, tiny_openclip, "--batch-size", "16")
    assert watcher.next_event()["event"] == "sync"
    rng = np.random.default_rng(0)
    staging = tmp_path / "staging"
    staging.mkdir()
    for i in range(1000):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(staging / f"{i:04d}.png")
    for p in sorted(staging.iterdir()):
        os.rename(p, folder / p.name)  # each file appears whole, as a sync tool's would
    total = 0
    while total < 1000:
        total += watcher.next_event()["embedded"]
    assert total == 1000 and len(_paths(db)) == 1000
    with clipsearch.open(db) as col:
        assert col.failures() == []

    # SIGTERM while a batch is being embedded: the batch is finished and stored, then it stops
    for i in range(300):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(staging / f"x{i:04d}.png")
    for p in sorted(staging.iterdir()):
        os.rename(p, folder / p.name)
    deadline = time.monotonic() + 60
    # a count, not a read of every row: the poll must see the first batch land, long before the
    # 19th does (reading 1000 rows' vectors took longer than the whole burst on a busy machine)
    while _count(db) == 1000 and time.monotonic() < deadline:
        time.sleep(0.005)
    at_signal = _count(db)
    code, err = watcher.stop(signal.SIGTERM)
    assert code == 0 and "stopping after the current batch" in err and "stopped" in err, err
    reported = 1000 + sum(e.get("embedded", 0) for e in _drain(watcher))
    stored = len(_paths(db))
    assert stored == reported > 1000  # what it embedded, it stored and reported: no half batch
    assert stored > at_signal, "the signal came after the batch, not in the middle of it"


def _drain(watcher: WatchProcess) -> list[dict]:
    events = []
    while True:
        try:
            events.append(watcher.lines.get(timeout=1))
        except queue.Empty:
            return events


def test_serve_watch_keeps_the_gallery_current(tmp_path, tiny_openclip):
    folder, db = tmp_path / "served", tmp_path / "s.db"
    write_photos(folder, ["astronaut", "coffee"])
    spec = ModelSpec(weights=tiny_openclip, device="cpu")
    settings = ServerSettings(db=str(db), watch=(folder,))
    app = create_app(settings, lambda: (load_encoder(spec), spec))
    with RunningServer(app) as srv, httpx.Client(base_url=srv.wait_ready().url, timeout=30) as c:

        def paths() -> set[str]:
            response = c.post("/api/v1/search", json={"text": "a photo", "limit": 50})
            if response.status_code != 200:
                return set()
            return {Path(r["metadata"]["path"]).name for r in response.json()["results"]}

        def wait_for(expected: set[str]) -> None:
            deadline = time.monotonic() + 60
            while paths() != expected:
                assert time.monotonic() < deadline, paths()
                time.sleep(0.1)

        wait_for({"astronaut.jpg", "coffee.jpg"})
        write_photos(folder, ["rocket"])
        (folder / "coffee.jpg").unlink()
        wait_for({"astronaut.jpg", "rocket.jpg"})


def test_no_change_is_lost_in_any_window(tmp_path, tiny_model):
    """Files written while the first pass runs, between two batches and while a batch runs are
    all stored: the OS watch starts before the first pass, and every pass reconciles the store
    with the folder (the newcomer issue, point 1: a file added during the first pass was lost
    for good)."""
    from clipsearch.watch import Watcher

    from ..conftest import noise_png, stored_items

    folder = tmp_path / "photos"
    write_photos(folder)
    db = tmp_path / "w.db"
    injected: list[str] = []

    def inject(name: str) -> None:
        (folder / name).write_bytes(noise_png(500 + len(injected)))
        injected.append(name)

    events = []

    def progress(done: int, total: int) -> None:
        # inside a pass, after its files were listed
        if len(events) == 0 and "during-first-pass.png" not in injected:
            inject("during-first-pass.png")
        elif len(events) == 1 and "during-a-batch.png" not in injected:
            inject("during-a-batch.png")

    def on_event(event) -> None:
        events.append(event.kind)
        if len(events) == 1:
            inject("between-batches.png")  # after the first pass, before the next batch

    with clipsearch.open(db, weights=tiny_model) as col:
        watcher = Watcher(col, [folder], quiet_ms=200, max_wait_ms=1000, on_event=on_event, progress=progress)
        thread = threading.Thread(target=watcher.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 90
            while not (len(injected) == 3 and stored_items(db) == len(list(folder.iterdir()))):
                assert thread.is_alive(), "the watcher stopped"
                assert time.monotonic() < deadline, (
                    f"stored {stored_items(db)} of {len(list(folder.iterdir()))}: {events}"
                )
                time.sleep(0.2)
        finally:
            watcher.stop()
            thread.join(timeout=60)
    assert events[0] == "sync" and len(events) >= 3
    with sqlite3.connect(db) as conn:
        stored = {Path(path).name for (path,) in conn.execute("SELECT json_extract(metadata, '$.path') FROM items")}
    assert stored == {p.name for p in folder.iterdir()}


def test_a_second_sigterm_stops_at_once(tmp_path, tiny_openclip):
    """The newcomer issue, point 9: a second SIGTERM only repeated "stopping after the current
    batch" and the first pass ran to its end. Now the second signal stops at once, and what was
    stored is whole (each batch is one transaction)."""
    from ..conftest import noise_images, stored_items

    folder, db = tmp_path / "many", tmp_path / "m.db"
    noise_images(folder, 400, size=(64, 48))
    watcher = WatchProcess(folder, db, tiny_openclip, "--batch-size", "8")
    deadline = time.monotonic() + 90
    while stored_items(db) == 0:  # the first pass is under way
        assert time.monotonic() < deadline and watcher.proc.poll() is None
        time.sleep(0.02)
    watcher.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    watcher.proc.send_signal(signal.SIGTERM)
    code = watcher.proc.wait(timeout=60)
    err = watcher.proc.stderr.read()  # type: ignore[union-attr]
    assert code == 130 and err.count("stopping after the current batch") == 1, err
    assert 0 < stored_items(db) < 400
    with clipsearch.open(db) as col:
        assert len(col) == stored_items(db) and col.failures() == []
