"""What a person at a terminal sees: tables at their natural width (a path is never folded
across lines, so it can be copied whole), and a progress bar where someone watches, nothing
where output goes to a file."""

from __future__ import annotations

import clipsearch

from ..conftest import SAMPLE_PHOTOS, write_photos


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
