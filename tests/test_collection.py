"""The library API, ``clipsearch.open(...) -> Collection``, on SQLite and on PostgreSQL: ingest,
every kind of search, similar, duplicates, export, info, failures, embedding; the model guard
that every caller goes through; and a query path that imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import clipsearch
from clipsearch.encoders.towers import TowerEncoder
from clipsearch.pipeline import IngestOptions

from .conftest import make_tiny_openclip, sample_photo, write_photos


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "lib.db")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def library(tmp_path, tiny_openclip, db):
    """A collection with six sample photos ingested through the API."""
    folder = tmp_path / "photos"
    write_photos(folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with clipsearch.open(db, "photos", weights=tiny_openclip) as collection:
        report = collection.ingest([folder], IngestOptions(batch_size=4))
    assert (report.embedded, report.failed) == (6, 1)
    return db, folder


def test_open_ingest_search_and_the_rest(library, tiny_openclip, tmp_path):
    db, folder = library
    # reopened without naming a model: the namespace's recorded model is used
    with clipsearch.open(db, "photos") as photos:
        assert len(photos) == 6 and photos.exists
        info = photos.info()
        assert (info.items, info.failures, info.identity.dim) == (6, 1, 32)
        assert info.identity.model == "local:tiny-openclip"
        [failure] = photos.failures()
        assert failure.source.endswith("broken.jpg")
        assert failure.reason == "not an image (unrecognised file format)"

        # by image: a stored photo finds itself first at 1.0, however it is given
        coffee = folder / "coffee.jpg"
        for query in (coffee, str(coffee), coffee.read_bytes(), Image.open(coffee)):
            hits = photos.search(image=query, limit=3)
            assert hits[0].path == str(coffee)
        assert photos.search(image=coffee, limit=1)[0].score > 0.9999

        # by raw vector: the stored vector finds its own item at 1.0
        vector = photos.embed_images([coffee])[0]
        hit = photos.search(vector=vector, limit=1)[0]
        assert hit.path == str(coffee) and hit.score > 0.9999
        assert set(vars(hit)) == {"item", "score"} and hit.metadata["filename"] == "coffee.jpg"

        # by text: ranked by the same vectors the model gives
        text_hits = photos.search("a cup of coffee", limit=6)
        query = photos.embed_texts(["a cup of coffee"])[0]
        stored = [p for p in sorted(folder.glob("*.jpg")) if p.name != "broken.jpg"]
        expected = sorted(((float(photos.embed_images([p])[0] @ query), str(p)) for p in stored), reverse=True)
        assert [h.path for h in text_hits] == [p for _, p in expected]
        np.testing.assert_allclose([h.score for h in text_hits], [s for s, _ in expected], atol=1e-4)

        # keyword search needs no model; filters narrow every mode
        assert [h.metadata["filename"] for h in photos.search("rocket", mode="keyword")] == ["rocket.jpg"]
        only = photos.search("anything", filter={"filename": "chelsea.jpg"})
        assert [h.metadata["filename"] for h in only] == ["chelsea.jpg"]

        near = photos.similar(hit.id, limit=2)
        assert len(near) == 2 and hit.id not in {h.id for h in near}
        assert photos.duplicates(threshold=0.9999) == []

        count = photos.export(tmp_path / "v.npy")
        matrix = np.load(tmp_path / "v.npy")
        meta = json.loads((tmp_path / "v.json").read_text())
        assert count == 6 and matrix.shape == (6, 32) and len(meta["items"]) == 6
        assert photos.delete([hit.id]) == 1 and len(photos) == 5


def test_errors_are_types_with_fields(library, tmp_path):
    db, _ = library
    with clipsearch.open(db, "photos") as photos:
        with pytest.raises(clipsearch.ItemNotFoundError) as e:
            photos.similar("nope")
        assert (e.value.item_id, e.value.namespace) == ("nope", "photos")
        with pytest.raises(clipsearch.UsageError) as e:
            photos.similar(photos.search("x", limit=1)[0].id, same_filter=["client"])
        assert e.value.param == "same_filter" and "--" not in e.value.message
        with pytest.raises(clipsearch.ImageError, match=r"nope\.jpg: file does not exist"):
            photos.search(image=tmp_path / "nope.jpg")
        with pytest.raises(clipsearch.DimensionError):
            photos.search(vector=[1.0, 0.0])
        with pytest.raises(clipsearch.UsageError, match="exactly one"):
            photos.search("a", vector=[1.0] * 32)
    with clipsearch.open(db, "empty") as empty, pytest.raises(clipsearch.NamespaceNotFoundError) as e:
        empty.search("a cat")
    assert e.value.namespace == "empty"
    if "://" not in db:
        with pytest.raises(clipsearch.NoDatabaseError):
            clipsearch.open(tmp_path / "absent.db", create=False)


def test_another_model_is_refused_for_search_and_ingest(library, tmp_path):
    """The guard has no back door: the API refuses what the CLI and the server refuse."""
    db, folder = library
    other = make_tiny_openclip(tmp_path / "other-model", seed=7)
    with clipsearch.open(db, "photos", weights=other) as photos:
        for attempt in (
            lambda: photos.search("a cat"),
            lambda: photos.search(image=folder / "coffee.jpg"),
            lambda: photos.embed_texts(["a cat"]),
            lambda: photos.ingest([folder]),
        ):
            with pytest.raises(clipsearch.ModelMismatchError) as e:
                attempt()
            assert e.value.namespace == "photos"
            assert e.value.stored.model == "local:tiny-openclip" and e.value.requested.model == "local:other-model"
        # nothing was written by the refused ingest, and a search with no model still works
        assert len(photos) == 6
        assert photos.search("rocket", mode="keyword")[0].metadata["filename"] == "rocket.jpg"


def test_text_query_loads_only_the_text_tower_without_torch(library):
    """A cold text query in a fresh interpreter: ONNX towers, our tokenizer, no torch, and only
    the tower it needs. The first query of a model exported the towers (in the fixture's
    process, by an earlier search); this one finds them."""
    db, folder = library
    with clipsearch.open(db, "photos") as photos:
        first = photos.search("a rocket", limit=6)  # exports the towers once, if not yet done
        assert isinstance(photos.query_encoder(), TowerEncoder)
    code = f"""
import json, sys
import clipsearch
with clipsearch.open({db!r}, "photos") as photos:
    hits = photos.search("a rocket", limit=6)
    towers = photos.query_encoder().loaded_towers()
print(json.dumps({{"ids": [h.id for h in hits], "scores": [h.score for h in hits], "towers": towers,
                  "torch": "torch" in sys.modules, "open_clip": "open_clip" in sys.modules}}))
"""
    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert result["towers"] == ["text"] and not result["torch"] and not result["open_clip"]
    image_query = f"""
import json, sys
import clipsearch
with clipsearch.open({db!r}, "photos") as photos:
    hit = photos.search(image={str(folder / "rocket.jpg")!r}, limit=1)[0]
    print(json.dumps([hit.path, hit.score, photos.query_encoder().loaded_towers(), "torch" in sys.modules]))
"""
    run = subprocess.run([sys.executable, "-c", image_query], capture_output=True, text=True, check=True)
    path, score, towers, torch_loaded = json.loads(run.stdout)
    assert path == str(folder / "rocket.jpg") and score > 0.9999 and towers == ["image"] and not torch_loaded
    assert result["ids"] == [h.id for h in first]
    np.testing.assert_allclose(result["scores"], [h.score for h in first], atol=1e-5)


def test_towers_give_the_torch_vectors(library, tiny_openclip):
    """fp32 ONNX towers with our tokenizer and numpy preprocessing equal PyTorch's vectors."""
    db, folder = library
    texts = ["a photo of a cat", "東京タワーの夜景", "바닷가를 달리는 개", "a red dress " * 30, "&amp; 🐶"]
    images = [sample_photo(n) for n in ("coffee", "rocket", "astronaut")]
    with clipsearch.open(db, "photos") as towers, clipsearch.open(db, "photos", runtime="torch") as torch_path:
        assert isinstance(towers.query_encoder(), TowerEncoder)
        assert not isinstance(torch_path.query_encoder(), TowerEncoder)
        for a, b in (
            (towers.embed_texts(texts), torch_path.embed_texts(texts)),
            (towers.embed_images(images), torch_path.embed_images(images)),
        ):
            assert (a * b).sum(axis=1).min() >= 0.99999


def test_cli_and_info_import_no_torch(tmp_path, library):
    db, _ = library
    code = f"""
import json, sys
from typer.testing import CliRunner
import clipsearch.cli
result = CliRunner().invoke(clipsearch.cli.app, ["info", "--db", {db!r}, "--json"])
assert result.exit_code == 0, result.output
args = ["search", "rocket", "--mode", "keyword", "-n", "photos", "--db", {db!r}, "--json"]
result = CliRunner().invoke(clipsearch.cli.app, args)
assert result.exit_code == 0 and "rocket.jpg" in result.output, result.output
first = json.loads(result.output.splitlines()[0])["id"]
for args in (
    ["similar", first, "-n", "photos"],
    ["duplicates", "-n", "photos"],
    ["failures"],
    ["export", "--npy", {str(tmp_path / "x.npy")!r}, "--meta", {str(tmp_path / "x.json")!r}, "-n", "photos"],
):
    result = CliRunner().invoke(clipsearch.cli.app, [*args, "--db", {db!r}])
    assert result.exit_code == 0, (args, result.output)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "transformers", "onnxruntime")))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_weights_file_without_a_tag_is_not_called_openai(tmp_path, tiny_openclip):
    """A checkpoint file given without --pretrained is recorded as what it is, not as OpenAI's."""
    from clipsearch.collection import ModelChoice

    spec = ModelChoice(model="ViT-B-32", weights=tmp_path / "model.pt").resolve(None)
    assert spec.pretrained is None
    tagged = ModelChoice(model="ViT-B-32", weights=tmp_path / "m.pt", pretrained="openai").resolve(None)
    assert tagged.pretrained == "openai"
    assert ModelChoice().resolve(None).pretrained == "openai"  # the hub default stays OpenAI's
