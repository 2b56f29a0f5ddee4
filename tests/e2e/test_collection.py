"""The library API, ``clipsearch.open(...) -> Collection``, on SQLite and on PostgreSQL: ingest,
every kind of search, similar, duplicates, export, info, failures, embedding; the model guard
that every caller goes through; and a query path that imports no torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipsearch
from clipsearch import IngestOptions
from clipsearch.encoders.towers import TowerEncoder
from clipsearch.errors import ModelMismatchError

from ..conftest import SAMPLE_PHOTOS, make_tiny_openclip, sample_photo, write_photos


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
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


# -- 4. export errors are one line, and the file is the one named -------------------------------
def test_export_errors_and_file_names(cli, photos, tmp_path):
    assert cli("ingest", photos)[0] == 0
    code, _, err = cli("export", "--npy", tmp_path / "nope" / "v.npy", "--meta", tmp_path / "m.json")
    assert code == 2 and err.startswith("error: cannot write") and "does not exist (--npy)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code, _, err = cli("export", "--format", "seed-compatible", "--out", a_file)
    assert code == 2 and "is a file" in err and "(--out)" in err and "Traceback" not in err
    code, out, _ = cli("export", "--npy", tmp_path / "v3", "--meta", tmp_path / "m3.json")
    assert code == 0 and f"to {tmp_path / 'v3'} " in out
    assert (tmp_path / "v3").is_file() and not (tmp_path / "v3.npy").exists()
    assert np.load(tmp_path / "v3").shape == (6, 32)


# -- 5. an explicit index kind is built ----------------------------------------------------------
def test_index_build_builds_the_kind_asked_for(cli, photos):
    assert cli("ingest", photos)[0] == 0  # a fresh flat index
    assert json.loads(cli("index", "status", "--json")[1])["id_map"] == 6  # the ingest wrote the first
    code, out, _ = cli("index", "build", "--kind", "hnsw")
    assert code == 0 and "default: hnsw index, 6 vectors, fresh" in out and "why hnsw: asked for" in out
    assert "a query: efSearch 128" in out and "id map: 6 ids, read by deletes of 5,000 or more" in out
    assert json.loads(cli("info", "--json")[1])["namespaces"][0]["index_id_map"] == 6
    assert json.loads(cli("info", "--json")[1])["namespaces"][0]["index"] == "hnsw"
    code, out, _ = cli("index", "build", "--kind", "flat")
    assert code == 0 and "flat index, 6 vectors" in out
    code, out, _ = cli("index", "status", "--json")
    assert code == 0 and json.loads(out)["kind"] == "flat" and json.loads(out)["vectors"] == 6
    assert json.loads(out)["search"] == "exact"
    code, out, _ = cli("index", "build")  # auto: chosen by size again
    assert "why flat: 6 vectors, fewer than 50,000: exact search" in cli("index", "status")[1]
    code, _, err = cli("index", "build", "--kind", "ivfpq")
    assert code == 2 and "needs at least 256 (there are 6); use the flat or hnsw kind" in err
    _, out, _ = cli("search", "--image", photos / "rocket.jpg", "--json", "--limit", "1")
    assert json.loads(out)["path"] == str(photos / "rocket.jpg")


def test_import_is_the_reverse_of_export(cli, photos, tmp_path):
    assert cli("ingest", photos)[0] == 0
    npy, meta = tmp_path / "v.npy", tmp_path / "v.json"
    assert cli("export", "--npy", npy, "--meta", meta)[0] == 0
    copy = tmp_path / "copy.db"
    code, out, _ = cli("import", "--npy", npy, "--meta", meta, "--db", copy)
    assert code == 0 and "imported 6 vectors into default" in out
    with clipsearch.open(cli.db) as a, clipsearch.open(copy) as b:
        assert a.identity() == b.identity()  # the model the export recorded, and how to load it
        assert a.store.namespace("default").model_spec == b.store.namespace("default").model_spec
        ids = sorted(it.id for it in a)
        assert [it.metadata for it in a.get(ids)] == [it.metadata for it in b.get(ids)]
        va, vb = a.store.get_vectors("default", ids), b.store.get_vectors("default", ids)
        assert all(np.allclose(va[i], vb[i], atol=1e-6) for i in ids)
    _, out, _ = cli("search", "--image", photos / "rocket.jpg", "--json", "--limit", "1", "--db", copy)
    assert json.loads(out)["path"] == str(photos / "rocket.jpg")
    seed = tmp_path / "seed"
    assert cli("export", "--format", "seed-compatible", "--out", seed)[0] == 0
    code, out, _ = cli("import", "--npy", seed, "--db", tmp_path / "seed.db")
    assert code == 0 and "imported 6 vectors" in out

    def refused(*args: object, db: Path = copy) -> str:
        code, out, err = cli("import", *args, "--db", db)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        return err

    assert "6 of these ids are already stored" in refused("--npy", npy, "--meta", meta, "--no-replace")
    np.save(tmp_path / "narrow.npy", np.ones((6, 16), dtype=np.float32))
    err = refused("--npy", tmp_path / "narrow.npy", "--meta", meta)
    assert "holds 16-d vectors" in err and "(--npy)" in err
    broken = np.load(npy)
    broken[3] = np.nan
    np.save(tmp_path / "nan.npy", broken)
    fresh = tmp_path / "fresh.db"
    assert "row 3: a vector of zeros, NaN or infinity" in refused(
        "--npy", tmp_path / "nan.npy", "--meta", meta, db=fresh
    )
    lines = tmp_path / "rows.jsonl"
    lines.write_text("".join(json.dumps({"id": f"r{i}"} if i != 2 else {"sku": 2}) + "\n" for i in range(6)))
    assert "rows.jsonl, record 2: no id (--meta)" in refused("--npy", npy, "--meta", lines, db=fresh)
    (tmp_path / "five.json").write_text(json.dumps([{"id": f"r{i}"} for i in range(5)]))
    assert "has 6 vectors but" in refused("--npy", npy, "--meta", tmp_path / "five.json", db=fresh)
    with clipsearch.open(fresh) as c:  # nothing was written by the refused imports
        assert not c.exists
    lines.write_text("".join(json.dumps({"id": f"r{i}", "shelf": i}) + "\n" for i in range(6)))
    code, out, _ = cli("import", "--npy", npy, "--meta", lines)  # no model recorded: the namespace's
    assert code == 0
    with clipsearch.open(cli.db) as c:
        assert len(c) == 12 and c.item("r4").metadata == {"shelf": 4}


def test_embed_refuses_another_model_for_a_namespace(cli, photos, tmp_path):
    assert cli("ingest", photos, "-n", "b32")[0] == 0
    other = make_tiny_openclip(tmp_path / "other", seed=5)
    code, _, err = cli("embed", "--text", "a cat", "--weights", other, "-n", "b32")
    assert code == 2 and "holds vectors of" in err


def test_another_architecture_is_refused_before_anything_loads(cli, photos, tmp_path):
    """Point 3: ``--model ViT-B-16`` on a namespace of another model exported ViT-B-16 for half a
    minute and then said its weights were missing. The request alone proves the mismatch: the
    refusal comes at once, and it names the real problem, from search, embed and ingest."""
    assert cli("ingest", photos)[0] == 0
    for args in (
        ("search", "a cat", "--model", "ViT-B-16"),
        ("embed", "--text", "a cat", "--model", "ViT-B-16"),
        ("ingest", photos, "--model", "ViT-B-16", "--pretrained", "openai"),
        ("search", "a cat", "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k"),
    ):
        started = time.monotonic()
        code, _, err = cli(*args, weights=False)
        assert code == 2 and "holds vectors of" in err and "model 'local:tiny-openclip' vs 'ViT-B-" in err, err
        assert "weights" not in err.lower(), err  # not the missing-weights error
        assert time.monotonic() - started < 5, "it loaded or exported something first"
    # the library says it the same way, with the reasons as a field
    with clipsearch.open(cli.db, model="ViT-B-16") as col, pytest.raises(ModelMismatchError) as e:
        col.search("a cat")
    assert e.value.reasons and e.value.requested.model == "ViT-B-16"


def test_the_same_weights_under_another_name_are_the_same_model(tmp_path):
    """Point 4: a byte-identical copy of the checkpoint folder under another name was refused as
    another model (with equal digests on both sides of the message). The content decides; a
    changed copy is still another model."""
    first = make_tiny_openclip(tmp_path / "A")
    copy = tmp_path / "model"
    shutil.copytree(first, copy)
    changed = make_tiny_openclip(tmp_path / "changed", seed=3)
    photos = write_photos(tmp_path / "photos", SAMPLE_PHOTOS[:3])
    db = tmp_path / "c.db"
    with clipsearch.open(db, weights=first) as col:
        col.ingest(photos[:2])
        before = col.embed_texts(["a cat"])
    with clipsearch.open(db, weights=copy) as col:
        report = col.ingest(photos)
        assert report.embedded == 1  # the copy adds the third photo, the first two stay
        assert np.allclose(col.embed_texts(["a cat"]), before, atol=1e-6)
        assert col.search(image=photos[2], limit=1)[0].metadata["filename"] == photos[2].name
    with clipsearch.open(db, weights=changed) as col, pytest.raises(ModelMismatchError, match="other file contents"):
        col.ingest(photos)


def test_filter_errors_name_their_argument(cli, photos):
    """Point 7: filter errors carried ``param=None``, though errors name the argument they are
    about, so each face can word it (``--filter`` on the command line, ``filter`` in the API)."""
    from clipsearch.errors import UsageError
    from clipsearch.filters import filter_ranges, filter_values

    for bad in ({"width": {"about": 3}}, {"width": {}}, {"width": {"gte": None}}):
        with pytest.raises(UsageError) as e:
            filter_ranges(bad)
        assert e.value.param == "filter"
    with pytest.raises(UsageError) as e:
        filter_values({"label') OR 1=1 --": "x"})
    assert e.value.param == "filter"
    assert cli("ingest", photos)[0] == 0
    with clipsearch.open(cli.db) as col, pytest.raises(UsageError) as e:
        col.search("a photo", mode="keyword", filter={"label') OR 1=1 --": "x"})
    assert e.value.param == "filter" and e.value.worded(lambda name: "--" + name).endswith("(--filter)")


def test_a_filter_that_could_only_match_nothing_is_refused_on_every_face(cli, photos):
    """The gallery issue: a filter on a key no item has, or a text bound on a number-only key,
    gave "no results" as if nothing matched; each face now says what would work."""
    from clipsearch.errors import UsageError

    assert cli("ingest", photos)[0] == 0
    code, _, err = cli("search", "a photo", "--filter", "colour=red")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no item has the metadata key 'colour' to filter on; their keys:" in err and "width" in err
    with clipsearch.open(cli.db) as col:
        with pytest.raises(UsageError, match="width is a number in every item") as e:
            col.search("a photo", mode="keyword", filter={"width": {"gte": "abc"}})
        assert e.value.param == "filter"
        with pytest.raises(UsageError, match="'colour'"):
            col.similar(next(iter(col)).id, filter={"colour": "red"})
        with pytest.raises(UsageError, match="'colour'"):
            col.browse(filter={"colour": "red"})
        # right keys: pages of a search join into its whole ranking; browsing pages too
        whole = [h.id for h in col.search("a photo", limit=6)]
        pages = [h.id for o in (0, 2, 4) for h in col.search("a photo", limit=2, offset=o)]
        assert pages == whole and len(set(whole)) == 6
        page = col.browse(limit=4, filter={"width": {"gte": 1}})
        assert (page.total, page.next_offset, len(col.browse(offset=4).items)) == (6, 4, 2)
        with pytest.raises(UsageError, match="5000"):
            col.search("a photo", limit=10, offset=4991)


def test_a_collection_reads_like_a_list_and_hits_like_rows(cli, photos):
    """Point 6: a Collection could only be counted (``len``), not iterated or listed, so seeing
    what is stored took an export to a file; ``repr(hit)`` was a nested ``Item(...)`` with the
    digest, and ``dict(hit)`` raised."""
    assert cli("ingest", photos)[0] == 0
    with clipsearch.open(cli.db) as col:
        items = list(col)
        assert len(items) == len(col) == 6 and len({i.id for i in items}) == 6
        assert [i.metadata["filename"] for i in col.items(filter={"filename": "coffee.jpg"})] == ["coffee.jpg"]
        assert [i.id for i in col.items(limit=2)] == [i.id for i in items[:2]]
        assert col.items(filter={"width": {"gte": 10**6}}) == []
        with pytest.raises(clipsearch.UsageError) as e:
            col.items(filter={"width": {"about": 3}})
        assert e.value.param == "filter"
        hit = col.search("a photo", filter={"filename": "coffee.jpg"})[0]
    assert repr(hit).startswith("Hit(score=") and "coffee.jpg" in repr(hit) and "sha256" not in repr(hit)
    assert repr(items[0]) == f"Item(id={items[0].id!r}, path={items[0].path!r})"
    row = dict(hit)
    assert set(row) == {"id", "score", "path", "metadata"} and row["path"].endswith("coffee.jpg")


def test_search_in_a_folder_keeps_it_current_and_prints_paths(tiny_model, tmp_path, monkeypatch):
    """Point 8, rclip's zero-step flow: ``search --in DIR`` brings the folder's photos up to date
    in a per-user database (XDG data dir) and searches only them; ``--paths`` prints one path a
    line. A point of point 7 too: ``KEY~=VALUE`` ignores the case of A-Z, ``=`` stays exact."""
    from typer.testing import CliRunner

    from clipsearch.cli import app

    monkeypatch.chdir(tmp_path)
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "CLIPSEARCH_DB": "", "CLIPSEARCH_WEIGHTS": str(tiny_model)}
    trips, other = tmp_path / "trips", tmp_path / "other"
    write_photos(trips, SAMPLE_PHOTOS[:3])
    write_photos(other, SAMPLE_PHOTOS[3:5])

    def search(*args: str) -> tuple[int, str, str]:
        result = CliRunner().invoke(app, ["search", *args], env=env, catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    code, out, err = search("a photo", "--in", str(trips), "--paths", "--limit", "10")
    assert code == 0, err
    assert sorted(out.splitlines()) == sorted(str(p) for p in trips.glob("*.jpg"))
    assert "updated" in err and "embedded 3" in err
    db = tmp_path / "data" / "clipsearch" / "clipsearch.db"
    assert db.is_file() and not (tmp_path / "clipsearch.db").exists()

    # another folder in the same database: each search sees only its own folder
    code, out, err = search("a photo", "--in", str(other), "--paths")
    assert code == 0 and {line.rsplit("/", 1)[0] for line in out.splitlines()} == {str(other)}, err
    # a second search reads no file and says nothing; a new and a deleted file are seen
    code, out, err = search("a photo", "--in", str(trips), "--paths")
    assert code == 0 and err == "" and len(out.splitlines()) == 3
    (trips / f"{SAMPLE_PHOTOS[0]}.jpg").unlink()
    shutil.copy(other / f"{SAMPLE_PHOTOS[3]}.jpg", trips / "new.jpg")
    code, out, err = search("a photo", "--in", str(trips), "--paths")
    assert code == 0 and "embedded 1, removed 1" in err, err
    assert sorted(out.splitlines()) == sorted(str(p) for p in trips.glob("*.jpg")), err
    with clipsearch.open(db) as col:
        assert len(col) == 5  # trips' three, less one, plus one; the other folder's two untouched
    # the case-insensitive filter form beside the exact one
    code, out, _ = search("a photo", "--in", str(trips), "--paths", "--filter", "filename=NEW.JPG")
    assert code == 0 and out == ""
    code, out, _ = search("a photo", "--in", str(trips), "--paths", "--filter", "filename~=NEW.JPG")
    assert code == 0 and out.splitlines() == [str(trips / "new.jpg")]
    code, _, err = search("a photo", "--in", str(tmp_path / "nowhere"))
    assert code == 2 and "nowhere" in err


def test_ingest_runs_on_the_export_once_it_is_made(cli, tmp_path):
    """On the CPU an open_clip model in fp32 runs on its ONNX export once there is one (the same
    vectors, without PyTorch's seconds of start-up, and without importing it). The first ingest
    runs PyTorch and makes the export; `info` says which runtime an ingest takes and why;
    `--runtime torch` is obeyed."""
    weights = make_tiny_openclip(tmp_path / "fresh-model", seed=7)  # weights of its own: no export yet
    write_photos(tmp_path / "a", SAMPLE_PHOTOS[:2])

    def ingest(folder: str, *extra: str) -> dict:
        code, out, err = cli("ingest", tmp_path / folder, "--weights", weights, "--json", *extra)
        assert code == 0, err
        return json.loads(out)

    assert ingest("a")["runtime"] == "torch"
    info = json.loads(cli("info", "--json")[1])["namespaces"][0]
    assert info["runtime"] == "onnx" and "ONNX export is made" in info["runtime_reason"]
    _, shown, _ = cli("info")
    assert "default: ingest runs on onnx: the model's ONNX export is made" in " ".join(shown.split())
    (new,) = write_photos(tmp_path / "b", SAMPLE_PHOTOS[2:3])
    # in a process of its own: the ingest on the export imports no torch, though it is installed
    code = f"""
import json, sys
from typer.testing import CliRunner
import clipsearch.cli
args = ["ingest", {str(tmp_path / "b")!r}, "--weights", {str(weights)!r}, "--db", {str(cli.db)!r}, "--json"]
result = CliRunner().invoke(clipsearch.cli.app, args)
assert result.exit_code == 0, result.output
report = json.loads(result.stdout)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "transformers", "faiss"))
print(json.dumps([report["runtime"], report["embedded"], loaded]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["onnx", 1, []]
    again = ingest("b")  # nothing new: no model loaded at all
    assert again["runtime"] == "" and again["embedded"] == 0 and again["skipped"] == 1
    # the export's vector lives in the PyTorch vectors' space: the photo finds itself first
    code, out, _ = cli("search", "--image", new, "--json", "--limit", "1")
    top = json.loads(out.splitlines()[0])
    assert top["path"] == str(new) and top["score"] > 0.9999
    write_photos(tmp_path / "d", SAMPLE_PHOTOS[4:5])
    assert ingest("d", "--runtime", "torch")["runtime"] == "torch"
    assert json.loads(cli("info", "--json")[1])["namespaces"][0]["runtime"] == "onnx"
