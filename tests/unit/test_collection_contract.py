"""The Collection's contract on the fake model: what ingest stores, what search ranks, what the
guard refuses. Real SQLite, real decoding; only the model is a fake (``conftest.FakeEncoder``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipsearch import IngestOptions, ModelMismatchError, UsageError
from clipsearch.pipeline import Ingestor, IngestPlan, LocalExecutor

from .conftest import COLOURS, FakeEncoder, paint


def test_ingest_then_search_by_text_image_and_vector(collection, photos):
    report = collection.ingest([photos])
    assert (report.embedded, report.failed, report.skipped) == (10, 0, 0)
    assert len(collection) == 10
    hits = collection.search("a red square", limit=2)
    assert sorted(h.path.rsplit("/", 1)[1] for h in hits) == ["red-1.png", "red-2.png"]
    by_image = collection.search(image=photos / "blue-1.png", limit=2)
    assert {h.path.rsplit("/", 1)[1] for h in by_image} == {"blue-1.png", "blue-2.png"}
    vector = collection.embed_texts(["green"])[0]
    assert collection.search(vector=vector * 3, limit=1)[0].path.endswith(("green-1.png", "green-2.png"))


def test_a_second_run_embeds_nothing_and_a_changed_file_again(collection, photos, fake):
    collection.ingest([photos])
    calls = fake.calls
    again = collection.ingest([photos])
    assert (again.embedded, again.skipped) == (0, 10) and fake.calls == calls
    paint(photos / "red-1.png", "yellow", size=(50, 50))  # same name, new picture
    changed = collection.ingest([photos])
    assert changed.embedded == 1
    yellows = collection.search("yellow", limit=3)
    assert any(h.path.endswith("red-1.png") for h in yellows)


def test_filters_limit_and_sample(collection, photos):
    report = collection.ingest([photos], IngestOptions(limit=3))
    assert report.embedded == 3
    collection.ingest([photos])
    wide = collection.search("red", filter={"width": {"gte": 60}}, limit=10)
    assert wide and all(h.metadata["width"] >= 60 for h in wide)
    assert collection.search("red", filter={"extension": {"iexact": "PNG"}}, limit=10)
    other = collection.make(namespace="sampled")
    assert other.ingest([photos], IngestOptions(sample=4, seed=1)).embedded == 4


def test_a_filter_key_written_by_another_process_is_accepted_at_once(collection, photos):
    """The keys a filter was checked against are kept (on PostgreSQL a fresh read scans every
    row); a key they lack is looked up again before a filter on it is refused."""
    collection.ingest([photos])
    assert collection.search("red", filter={"width": {"gte": 1}}, limit=1)
    with pytest.raises(UsageError, match="no item has the metadata key 'colour'"):
        collection.search("red", filter={"colour": "red"}, limit=1)
    with collection.make() as other:  # another writer, on its own store connection
        other.add_vectors(["painted"], other.embed_texts(["red"]), [{"colour": "red"}])
    hits = collection.search("red", filter={"colour": "red"}, limit=5)
    assert [h.id for h in hits] == ["painted"]


def test_similar_duplicates_and_delete(collection, photos):
    collection.ingest([photos])
    red = collection.search("red", limit=1)[0]
    similar = collection.similar(red.id, limit=1)
    assert similar[0].id != red.id and "red" in similar[0].path
    groups = collection.duplicates(threshold=0.99)
    assert groups and all(len({m.path.rsplit("/", 1)[1].split("-")[0] for m in g.items}) == 1 for g in groups)
    assert collection.delete([red.id]) == 1
    assert red.id not in {h.id for h in collection.search("red", limit=10)}


def test_a_broken_file_is_a_recorded_failure(collection, photos):
    (photos / "broken.png").write_bytes(b"\x89PNG not really")
    report = collection.ingest([photos])
    assert report.embedded == 10 and report.failed == 1
    assert [f.source for f in collection.failures()] == [str(photos / "broken.png")]
    data = json.loads(json.dumps(report.as_dict()))
    assert data["failed"] == 1 and data["failures"][0]["source"].endswith("broken.png")


def test_another_model_is_refused_by_ingest_and_search(collection, photos):
    collection.ingest([photos])
    other = collection.make(encoder=FakeEncoder("another-colour-model"))
    paint(photos / "new.png", "red")  # something to embed: a run with nothing new loads no model
    with pytest.raises(ModelMismatchError):
        other.ingest([photos])
    with pytest.raises(ModelMismatchError):
        other.search("red")


def test_prune_keeps_a_moved_file_and_drops_a_deleted_one(collection, photos, fake):
    collection.ingest([photos])
    (photos / "red-1.png").rename(photos / "renamed.png")
    (photos / "blue-1.png").unlink()
    calls = fake.calls
    report = collection.ingest([photos], prune=True)
    assert (report.removed, report.moved, report.embedded) == (1, 1, 0) and fake.calls == calls
    with pytest.raises(UsageError, match="prune"):
        collection.ingest([photos], IngestOptions(limit=2), prune=True)


class InlineExecutor:
    """An executor as small as one can be: decode, embed and write each item on the spot. The
    frame (claims, skips, the index, the report) is ``Ingestor.run``'s, whatever runs the work."""

    def start(self, ingestor):
        pass

    def execute(self, ingestor, candidates, report, advance):
        from clipsearch.decode_stage import decode_item
        from clipsearch.pipeline import item_row

        for item, _known in candidates:
            decoded = decode_item(item, None, ingestor.decode)
            row = item_row(item, decoded.sha256, decoded.size, namespace=ingestor.namespace, size_wh=decoded)
            vectors = ingestor.encoder.embed_crops(decoded.crop[None])
            ingestor.store.write_batch(ingestor.namespace, [row], vectors, [], [])
            report.embedded += 1
            advance()


@pytest.mark.parametrize("executor", [LocalExecutor, InlineExecutor])
def test_one_frame_for_every_executor(tmp_path, photos, fake, executor):
    from clipsearch.identity import ModelSpec
    from clipsearch.sources import FolderSource
    from clipsearch.store import open_store

    store = open_store(tmp_path / f"{executor.__name__}.db")
    spec = ModelSpec(model="fake-colour", pretrained=None, device="cpu", runtime="onnx")
    options = IngestOptions(batch_size=4)
    plan = IngestPlan.of([FolderSource(photos)], options)
    seen = []
    report = Ingestor(store, fake, spec, "default", options).run(plan, executor(), lambda d, t: seen.append((d, t)))
    assert report.embedded == 10 and seen[-1] == (10, 10)
    again = Ingestor(store, fake, spec, "default", options).run(plan, executor())
    assert (again.embedded, again.skipped) == (0, 10)  # the frame's skip check, not the executor's
    vectors = {it.id: v for items, m in store.iter_vectors("default") for it, v in zip(items, m, strict=True)}
    paths = {it.id: it.path for items, _ in store.iter_vectors("default") for it in items}
    red = next(v for i, v in vectors.items() if paths[i].endswith("red-1.png"))
    assert red.argmax() == 0 and np.isclose(np.linalg.norm(red), 1, atol=1e-5)
    assert store.search("default", fake.embed_texts(["red"]), k=2)[0][0].path.endswith(("red-1.png", "red-2.png"))
    store.close()


def test_colours_are_distinct_directions(fake):
    vectors = fake.embed_texts(list(COLOURS))
    similarity = vectors @ vectors.T
    assert (similarity[~np.eye(len(COLOURS), dtype=bool)] < 0.9).all()


def test_count_by_and_preview_ingest(collection, photos):
    """``info --by`` and ``ingest --dry-run`` in the library: counts without a model run."""
    preview = collection.preview_ingest([photos])
    assert (preview.listed, preview.new, preview.files, preview.unchanged) == (10, 10, 10, 0)
    collection.ingest([photos])
    assert sum(n for _, n in collection.count_by("width")) == 10
    assert len(collection.count_by("filename")) == 10 and {n for _, n in collection.count_by("filename")} == {1}
    preview = collection.preview_ingest([photos])
    assert (preview.unchanged, preview.new, preview.changed) == (10, 0, 0)
    with pytest.raises(UsageError, match="no item has the metadata key 'colour'"):
        collection.count_by("colour")
    empty = collection.make(namespace="empty")
    empty.store.bind_namespace("empty", empty.encoder.identity, empty.spec.to_dict())
    assert empty.count_by("colour") == []
