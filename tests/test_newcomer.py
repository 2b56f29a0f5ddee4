"""The newcomer issue (26), one test per point fixed, each failing before its fix. Point 1 (the
watcher's lost files) is in ``tests/test_watch.py``."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

import clipsearch
from clipsearch.errors import ModelMismatchError

from .conftest import SAMPLE_PHOTOS, make_tiny_openclip, write_photos


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


def test_tables_never_break_a_path(cli, tmp_path):
    """Point 9: the search and failures tables folded long paths across lines (at 80 columns),
    so a path could not be copied or grepped whole. Tables now take their natural width."""
    deep = tmp_path / ("a-folder-with-a-rather-long-name-" * 3) / "and-another-level-below-it"
    photos = write_photos(deep, SAMPLE_PHOTOS[:2])
    (deep / "broken-file-with-a-long-name-too.jpg").write_bytes(b"not a jpeg")
    assert cli("ingest", deep)[0] == 1  # one failure
    code, out, err = cli("search", "a photo", "--limit", "2")
    assert code == 0, err
    assert any(str(photos[0]) in line or str(photos[1]) in line for line in out.splitlines())
    assert len(max(out.splitlines(), key=len)) > 80
    code, out, _ = cli("failures")
    assert code == 0 and any(str(deep / "broken-file-with-a-long-name-too.jpg") in line for line in out.splitlines())


@pytest.mark.parametrize("keep", [0.5, 0.2, 200])
def test_a_truncated_heic_is_called_truncated(tmp_path, keep):
    """Point 9: a HEIC cut short was "not an image (unrecognised file format)", or a two-line
    libheif message. It is a truncated file, said in one line."""
    import io

    from pillow_heif import register_heif_opener

    from clipsearch.errors import ImageError
    from clipsearch.imaging import decode_image

    register_heif_opener()  # pillow-heif writes HEIC (the core reads it with pi-heif)
    buf = io.BytesIO()
    write_photos(tmp_path, ["coffee"])
    from PIL import Image

    Image.open(tmp_path / "coffee.jpg").save(buf, "HEIF")
    data = buf.getvalue()
    cut = data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep]
    with pytest.raises(ImageError) as e:
        decode_image(cut)
    assert str(e.value).startswith("truncated") and "\n" not in str(e.value), str(e.value)


def test_quantising_prints_nothing_of_onnx_runtimes(tmp_path):
    """Point 9: ONNX Runtime's quantiser logged "Please consider to run pre-processing before
    quantization" on the root logger, in the middle of ``eval --compare`` and ``models export``."""
    import subprocess
    import sys

    from .towers import make_tiny_towers

    folder = make_tiny_towers(tmp_path / "towers")
    code = (
        "import sys; from pathlib import Path; from clipsearch.encoders.towers import quantize; "
        "quantize(Path(sys.argv[1]))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (folder / "visual" / "model.int8.onnx").is_file()
    assert "quantization" not in done.stderr and "WARNING" not in done.stderr, done.stderr


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


def test_ingest_shows_progress_where_someone_watches(tmp_path, tiny_model, capfd, monkeypatch):
    """Point 6: a two-minute ``ingest()`` in a notebook printed nothing. ``progress=True`` shows
    a bar on a terminal (or in a notebook), and nothing where stderr is a file or a pipe."""
    photos = write_photos(tmp_path / "photos", SAMPLE_PHOTOS[:3])
    with clipsearch.open(tmp_path / "quiet.db", weights=tiny_model) as col:
        assert col.ingest(photos, progress=True).embedded == 3
    assert capfd.readouterr().err == ""
    monkeypatch.setenv("FORCE_COLOR", "1")  # Rich then treats stderr as a terminal
    with clipsearch.open(tmp_path / "shown.db", weights=tiny_model) as col:
        assert col.ingest(photos, progress=True).embedded == 3
    err = capfd.readouterr().err
    assert "ingest" in err and "3/3" in err, err


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
