"""The ingest pipeline's decode workers: threads and processes give the same store, and a
crashing decoder process costs only its own file (on the fake model: the workers are the point)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest

from clipsearch.decode_stage import Decoded, DecodeSettings, Unchanged, decode_item
from clipsearch.encoders import ModelSpec
from clipsearch.errors import UsageError
from clipsearch.pipeline import IngestOptions, Ingestor, default_workers, resolve_worker_type
from clipsearch.sources import FolderSource, SourceItem, file_item
from clipsearch.store import open_store

from ..conftest import sample_photo, write_photos


@dataclass
class CrashingItem(SourceItem):
    """Reading it kills the process, as a segfault in a native decoder would."""

    def read(self) -> bytes:
        if "crash" in self.path.name:
            os._exit(70)
        return super().read()


class CrashingSource:
    description = "test"

    def __init__(self, items: list[SourceItem]):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def _ingest(tmp_path, name, encoder, sources, **options):
    store = open_store(tmp_path / f"{name}.db")
    report = Ingestor(store, encoder, ModelSpec(), "default", IngestOptions(**options)).run(sources)
    vectors = {}
    for items, matrix in store.iter_vectors("default"):
        vectors.update((it.id, row) for it, row in zip(items, matrix, strict=True))
    failures = {f.id: f.reason for f in store.failures()}
    store.close()
    return report, vectors, failures


def test_process_workers_store_what_thread_workers_store(tmp_path, fake):
    folder = tmp_path / "photos"
    write_photos(folder)
    good = (folder / "coffee.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "notes.png").write_text("not an image")
    t_report, t_vectors, t_failures = _ingest(tmp_path, "t", fake, [FolderSource(folder)], worker_type="thread")
    p_report, p_vectors, p_failures = _ingest(
        tmp_path, "p", fake, [FolderSource(folder)], worker_type="process", workers=2, batch_size=4
    )
    assert t_report.embedded == p_report.embedded == 6
    assert t_failures == p_failures and len(p_failures) == 2
    assert set(t_vectors) == set(p_vectors)
    for key, vec in t_vectors.items():
        np.testing.assert_allclose(p_vectors[key], vec, atol=1e-6)


def test_a_crashing_decoder_process_fails_only_its_file(tmp_path, fake):
    folder = tmp_path / "photos"
    paths = write_photos(folder)
    crash = folder / "crash.jpg"
    crash.write_bytes(paths[0].read_bytes())
    items = [CrashingItem(**vars(file_item(p))) for p in sorted(folder.iterdir())]
    report, vectors, failures = _ingest(
        tmp_path, "c", fake, [CrashingSource(items)], worker_type="process", workers=2, batch_size=2
    )
    assert report.embedded == len(paths) == len(vectors)
    crash_id = file_item(crash).id
    assert failures == {crash_id: "the decoder process crashed on this file"}


def test_decode_item_crops_or_reports_unchanged(tmp_path, fake):
    path = tmp_path / "a.jpg"
    sample_photo("rocket").save(path, quality=90)
    settings = DecodeSettings(fake.preprocess_spec)
    first = decode_item(file_item(path), None, settings)
    assert isinstance(first, Decoded)
    assert first.crop.dtype == np.uint8 and first.crop.shape == (32, 32, 3)
    again = decode_item(file_item(path), first.sha256, settings)
    assert again == Unchanged(first.sha256, first.size)


def test_worker_type_defaults():
    assert resolve_worker_type("auto", "cpu") == "thread"
    assert resolve_worker_type("auto", "cuda") == "process"
    assert resolve_worker_type("process", "cpu") == "process"
    with pytest.raises(UsageError, match="unknown worker type"):
        resolve_worker_type("fibers", "cpu")
    assert 1 <= default_workers("thread") <= 4
    assert default_workers("process") == max(1, (os.cpu_count() or 1) - 1)
