"""``ingest --prune``: a namespace that follows its folder (the photo-library issue, point 3)."""

from __future__ import annotations

import json
import shutil

import numpy as np

import clipsearch

from ..conftest import write_photos


def _paths(db) -> dict[str, str]:
    with clipsearch.open(db) as col:
        return {it.metadata["path"]: it.id for items, _ in col.store.iter_vectors("default") for it in items}


def test_prune_removes_what_is_gone_and_keeps_the_vector_of_what_moved(cli, tmp_path):
    folder = tmp_path / "library"
    photos = write_photos(folder, ["astronaut", "chelsea", "coffee", "rocket"])
    (folder / "broken.jpg").write_bytes(b"not an image")
    db = tmp_path / "test.db"
    assert cli("ingest", str(folder))[0] == 1  # the broken file failed
    with clipsearch.open(db) as col:
        moved_vector = col.store.get_vectors("default", [_paths(db)[str(photos[2])]])
        moved_vector = next(iter(moved_vector.values()))

    photos[0].unlink()  # deleted
    (folder / "trip").mkdir()
    shutil.move(photos[2], folder / "trip" / "espresso.jpg")  # renamed and moved
    (folder / "broken.jpg").unlink()  # its failure goes too
    write_photos(folder, ["colorwheel"])  # new
    # without --prune nothing is removed: the deleted photo is still found
    assert str(photos[0]) in _paths(db)

    code, out, err = cli("ingest", str(folder), "--prune", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["removed"], report["moved"], report["embedded"]) == (1, 1, 1)
    paths = _paths(db)
    assert str(photos[0]) not in paths and str(photos[2]) not in paths
    assert str(folder / "trip" / "espresso.jpg") in paths and len(paths) == 4
    with clipsearch.open(db) as col:
        new_vector = next(
            iter(col.store.get_vectors("default", [paths[str(folder / "trip" / "espresso.jpg")]]).values())
        )
        np.testing.assert_array_equal(new_vector, moved_vector)  # kept, not embedded again
        assert col.failures() == []
        hits = col.search("a photo", limit=10)
        assert {h.path for h in hits} == set(paths)  # the index follows too
    # the summary line says it
    photos[1].unlink()
    code, out, _ = cli("ingest", str(folder), "--prune")
    assert code == 0 and "removed 1 whose file is gone" in out


def test_prune_refuses_a_partial_run_and_sources_it_cannot_own(cli, tmp_path):
    folder = tmp_path / "library"
    write_photos(folder, ["astronaut", "chelsea"])
    for extra in (["--limit", "1"], ["--sample", "1"]):
        code, _, err = cli("ingest", str(folder), "--prune", *extra)
        assert code == 2 and "would remove items merely left out of this run" in err and extra[0] in err
    code, _, err = cli("ingest", str(folder / "astronaut.jpg"), "--prune")
    assert code == 2 and "is a single file, which owns no other items" in err


def test_prune_leaves_other_folders_alone(cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_photos(a, ["astronaut"])
    photos_b = write_photos(b, ["rocket", "coffee"])
    assert cli("ingest", str(a))[0] == 0 and cli("ingest", str(b))[0] == 0
    photos_b[0].unlink()
    code, out, err = cli("ingest", str(a), "--prune", "--json")
    assert code == 0, err
    assert json.loads(out)["removed"] == 0
    assert str(photos_b[0]) in _paths(tmp_path / "test.db")  # b was not named: its item stays


def test_prune_follows_an_image_list(cli, tmp_path):
    photos = write_photos(tmp_path / "p", ["astronaut", "chelsea", "coffee", "rocket"])
    listing = tmp_path / "list.csv"
    listing.write_text("".join(f"{p},label{i}\n" for i, p in enumerate(photos)))
    other = tmp_path / "other.csv"
    other.write_text(f"{photos[3]}\n")
    db = tmp_path / "test.db"
    assert cli("ingest", f"image-list:{listing}")[0] == 0
    # the list drops a row, a listed file is deleted, another is renamed (and the list says so)
    photos[0].unlink()
    renamed = photos[2].with_name("espresso.jpg")
    photos[2].rename(renamed)
    listing.write_text(f"{photos[0]},label0\n{photos[1]},label1\n{renamed},label2\n")
    code, out, err = cli("ingest", f"image-list:{listing}", "--prune", "--json")
    assert code == 1, err  # the listed file that is gone is a failure of this run
    report = json.loads(out)
    assert (report["removed"], report["moved"], report["embedded"]) == (2, 1, 0)
    assert set(_paths(db)) == {str(photos[1]), str(renamed)}
    # a list prunes only what it put there: the same photo ingested from another list stays
    assert cli("ingest", f"image-list:{other}")[0] == 0
    listing.write_text(f"{photos[1]},label1\n")
    code, out, _ = cli("ingest", f"image-list:{listing}", "--prune", "--json")
    assert json.loads(out)["removed"] == 1 and set(_paths(db)) == {str(photos[1]), str(photos[3])}


def test_prune_follows_a_catalog(cli, tmp_path):
    photos = write_photos(tmp_path / "p", ["astronaut", "chelsea", "coffee"])
    products = tmp_path / "products.csv"
    rows = [("sku1", photos[0]), ("sku2", photos[1]), ("sku3", photos[2])]
    products.write_text("id,image\n" + "".join(f"{i},{p}\n" for i, p in rows))
    db = tmp_path / "test.db"
    assert cli("ingest", f"catalog:{products}")[0] == 0
    products.write_text("id,image\n" + "".join(f"{i},{p}\n" for i, p in rows[1:]))
    # without --prune a row that left the catalog stays
    code, out, _ = cli("ingest", f"catalog:{products}", "--json")
    assert json.loads(out)["removed"] == 0
    with clipsearch.open(db) as col:
        assert col.store.count("default") == 3
    photos[2].unlink()  # a row whose file is gone
    code, out, err = cli("ingest", f"catalog:{products}", "--prune", "--json")
    assert code == 1, err
    assert json.loads(out)["removed"] == 2
    with clipsearch.open(db) as col:
        assert [it.id for it in col.get(["sku1", "sku2", "sku3"])] == ["sku2"]
        assert {h.id for h in col.search("a photo", limit=5)} == {"sku2"}
