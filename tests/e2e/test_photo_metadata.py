"""What photo users filter by (the photo-library issue, point 6): the EXIF facts stored with
each photo (taken_at, camera, GPS) and range filters on numbers and dates, with the same meaning
in the Python rules, SQLite, PostgreSQL, the CLI, the HTTP API and the gallery's filter field."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

import clipsearch
from clipsearch.encoders import ModelIdentity, ModelSpec, load_encoder
from clipsearch.errors import UsageError
from clipsearch.filters import filter_ranges, matches
from clipsearch.imaging import decode_image
from clipsearch.server import ServerSettings, create_app
from clipsearch.store import NewItem, SQLiteStore
from clipsearch.store.postgres import PostgresStore

from ..conftest import RunningServer, sample_photo


def exif_bytes(taken: str | None = None, make: str | None = None, model: str | None = None, gps=None, offset=None):
    exif = Image.Exif()
    if make:
        exif[0x010F] = make
    if model:
        exif[0x0110] = model
    if taken:
        exif.get_ifd(0x8769)[0x9003] = taken
    if offset:
        exif.get_ifd(0x8769)[0x9011] = offset
    if gps:
        (lat, lat_ref), (lon, lon_ref) = gps
        g = exif.get_ifd(0x8825)
        g[1], g[2] = lat_ref, tuple(IFDRational(x) for x in lat)
        g[3], g[4] = lon_ref, tuple(IFDRational(x) for x in lon)
    return exif.tobytes()


EIFFEL = ((48, 51, 29.64), "N"), ((2, 17, 40.32), "E")
SYDNEY = ((33, 51, 25.0), "S"), ((151, 12, 36.0), "E")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "HEIF", "AVIF"])
def test_photo_facts_are_read_from_every_format(tmp_path, fmt):
    if fmt == "HEIF":
        from pillow_heif import register_heif_opener

        register_heif_opener()
    image = sample_photo("rocket").resize((96, 64))
    buf = tmp_path / f"x.{fmt.lower()}"
    image.save(buf, fmt, exif=exif_bytes("2024:06:15 14:30:05", "Canon", "EOS R5\x00", EIFFEL, "+02:00"))
    facts = decode_image(buf.read_bytes(), draft_size=32).photo
    assert facts == {
        "taken_at": "2024-06-15T14:30:05+02:00",
        "camera_make": "Canon",
        "camera_model": "EOS R5",
        "gps_lat": pytest.approx(48.8582333),
        "gps_lon": pytest.approx(2.2945333),
    }


def test_missing_blank_and_malformed_facts_are_left_out():
    def facts(exif: bytes) -> dict:
        buf = __import__("io").BytesIO()
        Image.new("RGB", (32, 32)).save(buf, "JPEG", exif=exif)
        return decode_image(buf.getvalue()).photo

    assert facts(b"") == {}
    assert facts(exif_bytes("0000:00:00 00:00:00", make="  ")) == {}  # no clock, blank make
    assert facts(exif_bytes("2023:02:30 10:00:00")) == {}  # no such day
    assert facts(exif_bytes("2023:12:24 18:00:00", offset="garbage")) == {"taken_at": "2023-12-24T18:00:00"}
    south = facts(exif_bytes(gps=SYDNEY))
    assert south["gps_lat"] == pytest.approx(-33.8569444) and south["gps_lon"] == pytest.approx(151.21)
    assert facts(exif_bytes(gps=(((200, 0, 0), "N"), ((2, 0, 0), "E")))) == {}  # beyond the pole


# -- the rules ------------------------------------------------------------------------------
def test_range_rules():
    row = {"width": 1200, "price": "19.99", "taken_at": "2024-06-30T18:05:00", "label": "cat", "tags": [3, 12]}
    assert matches(row, {"width": {"gte": "1000"}}) and not matches(row, {"width": {"gt": 1200}})
    assert matches(row, {"price": {"lt": 20}}) and not matches(row, {"price": {"lt": "9"}})  # numerically
    assert matches(row, {"taken_at": {"gte": "2024-06-01", "lte": "2024-06-30"}})  # the whole last day
    assert not matches(row, {"taken_at": {"gt": "2024-06-30"}}) and not matches(row, {"taken_at": {"lt": "2024-06"}})
    assert matches(row, {"taken_at": {"gte": 2024, "lte": 2024}})  # a year, written as a number
    assert matches(row, {"tags": {"gt": 10}}) and not matches(row, {"tags": {"gt": 12}})  # any element
    assert matches(row, {"label": {"gte": "c"}}) and not matches(row, {"label": {"lt": 0}})  # text by code point
    assert not matches(row, {"missing": {"gte": 0}})
    assert matches(row, {"label": "cat", "width": {"lt": 2000}})
    with pytest.raises(UsageError, match="unknown filter operator 'ge'"):
        filter_ranges({"width": {"ge": 1}})
    with pytest.raises(UsageError, match="needs a number, a date or a word"):
        filter_ranges({"width": {"gte": True}})


VALUES = st.one_of(
    st.integers(-5, 2000),
    st.floats(-5, 2000, allow_nan=False).map(lambda x: round(x, 2)),
    st.sampled_from(["19.99", " 7", "1e3", "abc", "2024-06-30T18:05:00", "2024-06-30", "2023-12-01T00:00:00+01:00"]),
    st.booleans(),
)
BOUNDS = st.one_of(
    st.integers(-5, 2000),
    st.sampled_from(["1000", "19.99", "2024", "2024-06", "2024-06-30", "2024-06-30T18:05", "abc", "b"]),
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request, tmp_path):
    ident = ModelIdentity("open_clip", "tiny", "", 4, {"size": [224, 224]})
    if request.param == "sqlite":
        store = SQLiteStore(tmp_path / "r.db")
    else:
        store = PostgresStore(request.getfixturevalue("pg_url"))
    store.bind_namespace("default", ident, {})
    yield store
    store.close()


def assert_store_agrees(backend, rows: list, filters: dict) -> None:
    """Rows of ``{"v": value}`` (none where the value is None) in the store: the vector search
    and keyword search with ``filters`` return exactly the rows the Python rules pass."""
    backend.delete_items("default", [f"r{i}" for i in range(12)])
    metas = [({"v": v} if v is not None else {}) | {"t": "word"} for v in rows]
    vectors = np.tile(np.array([[1, 0, 0, 0]], np.float32), (len(rows), 1))
    backend.write_batch("default", [NewItem(f"r{i}", m) for i, m in enumerate(metas)], vectors)
    expected = {f"r{i}" for i, m in enumerate(metas) if matches(m, filters)}
    hits = backend.search("default", vectors[:1], 12, filters)[0]
    assert {h.item.id for h in hits} == expected, (rows, filters)
    assert {h.item.id for h in backend.keyword_search("default", "word", 12, filters)} == expected
    # the keys with the kinds of their values, as every write left them (SQLite keeps a count)
    kinds: dict[str, dict[str, int]] = {"t": {"text": len(metas)}}
    for m in metas:
        if "v" in m:
            kind = {bool: "bool", int: "number", float: "number", str: "text", list: "list"}[type(m["v"])]
            kinds.setdefault("v", {})[kind] = kinds.get("v", {}).get(kind, 0) + 1
    assert backend.metadata_keys("default") == kinds


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.one_of(VALUES, st.lists(VALUES, max_size=3), st.none()), min_size=1, max_size=12),
    ops=st.dictionaries(st.sampled_from(["gt", "gte", "lt", "lte"]), BOUNDS, min_size=1, max_size=2),
)
def test_stores_agree_with_the_rules(backend, rows, ops):
    """Whatever the values and bounds, SQLite and PostgreSQL return exactly the rows the Python
    rules pass, inside the vector search and in keyword search."""
    assert_store_agrees(backend, rows, {"v": ops})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.one_of(VALUES, st.lists(VALUES, max_size=3), st.none()), min_size=1, max_size=12),
    wanted=st.lists(st.one_of(VALUES, BOUNDS.map(str)), min_size=1, max_size=3),
)
def test_stores_agree_with_the_rules_for_values(backend, rows, wanted):
    """Equality too (a value, any of a list of values, typed variants, list elements): both
    stores return the rows the Python rules pass."""
    assert_store_agrees(backend, rows, {"v": wanted})


# letters that fold (ASCII) and letters that must not (accented, Greek, Turkish dotted I, a
# ligature), regex and JSON path metacharacters, and CJK
TEXTS = st.text(alphabet='aAbBzZÉéΣσİiﬁ.*+?^$()[]{}|\\" -_1한字', max_size=6)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.one_of(TEXTS, st.lists(TEXTS, max_size=3), VALUES, st.none()), min_size=1, max_size=12),
    wanted=st.one_of(TEXTS, st.lists(TEXTS, min_size=1, max_size=3)),
)
def test_stores_agree_on_case_insensitive_equality(backend, rows, wanted):
    """``iexact`` folds A-Z and nothing else, identically in SQLite, PostgreSQL and Python,
    whatever characters the texts hold."""
    assert_store_agrees(backend, rows, {"v": {"iexact": wanted}})


def test_case_insensitive_equality_rules():
    assert matches({"make": "Apple"}, {"make": {"iexact": "APPLE"}})
    assert matches({"make": ["x", "apple"]}, {"make": {"iexact": ["canon", "aPPle"]}})
    assert not matches({"make": "Apple Inc"}, {"make": {"iexact": "apple"}})  # equality, not a prefix
    assert not matches({"make": "É"}, {"make": {"iexact": "é"}})  # only A-Z fold
    assert not matches({"n": 500}, {"n": {"iexact": "500"}})  # text only
    assert matches({"make": "apple", "w": 5}, {"make": {"iexact": "Apple"}, "w": {"gte": 1}})
    with pytest.raises(UsageError, match="iexact compares text"):
        matches({}, {"make": {"iexact": 5}})


# -- end to end -----------------------------------------------------------------------------
@pytest.fixture
def trips(tmp_path):
    """Photos from three trips, each with its own camera, date and place."""
    folder = tmp_path / "trips"
    folder.mkdir()
    shots = {
        "paris.jpg": ("rocket", "2024:06:15 14:30:05", "Canon", EIFFEL, (640, 480)),
        "sydney.jpg": ("coffee", "2024:07:02 09:00:00", "Apple", SYDNEY, (400, 300)),
        "home.png": ("chelsea", "2023:12:24 18:00:00", "Canon", None, (1600, 1200)),
    }
    for name, (photo, taken, make, gps, size) in shots.items():
        img = sample_photo(photo).resize(size)
        img.save(folder / name, exif=exif_bytes(taken, make, "Model X", gps))
    Image.new("RGB", (1200, 900), "gray").save(folder / "scan.jpg")  # no EXIF at all
    return folder


def _ids(out: str) -> set[str]:
    return {json.loads(line)["path"].rsplit("/", 1)[-1] for line in out.splitlines()}


def test_cli_stores_facts_and_filters_by_range(cli, trips):
    assert cli("ingest", str(trips))[0] == 0
    with clipsearch.open(cli.db) as col:
        meta = {it.metadata["path"].rsplit("/", 1)[-1]: it.metadata for items, _ in col.store.iter_vectors("default")
                for it in items}  # fmt: skip
    assert meta["paris.jpg"]["taken_at"] == "2024-06-15T14:30:05" and meta["paris.jpg"]["camera_make"] == "Canon"
    assert meta["sydney.jpg"]["gps_lat"] == pytest.approx(-33.8569444)
    assert "taken_at" not in meta["scan.jpg"] and meta["scan.jpg"]["width"] == 1200

    def search(*filters: str) -> set[str]:
        args = [x for f in filters for x in ("--filter", f)]
        code, out, err = cli("search", "a photo", "--json", "--limit", "10", *args)
        assert code == 0, err
        return _ids(out)

    assert search("taken_at>=2024-06-01") == {"paris.jpg", "sydney.jpg"}
    assert search("taken_at>=2024-06-01", "taken_at<=2024-06-15") == {"paris.jpg"}  # the whole 15th
    assert search("taken_at<2024") == {"home.png"}
    assert search("width>=1000") == {"home.png", "scan.jpg"}
    assert search("camera_make=Canon", "width<1000") == {"paris.jpg"}
    assert search("gps_lat<0") == {"sydney.jpg"}
    assert search("camera_make=canon") == set()  # exact by default
    assert search("camera_make~=canon") == {"paris.jpg", "home.png"}
    assert search("camera_make~=CANON", "camera_make~=apple", "width<1000") == {"paris.jpg", "sydney.jpg"}
    code, _, err = cli("search", "a photo", "--filter", "width")
    assert code == 2 and "bad --filter 'width': use KEY=VALUE, KEY~=VALUE (any case) or KEY>=VALUE" in err
    code, _, err = cli("search", "a photo", "--filter", "width>=1", "--filter", "width=2")
    assert code == 2 and "either values (width=...) or a range (width>=...)" in err
    # keyword search finds the camera, not the dates
    code, out, _ = cli("search", "Apple", "--mode", "keyword", "--json")
    assert _ids(out) == {"sydney.jpg"}


def test_http_and_gallery_filter_by_range(cli, trips, tiny_openclip):
    assert cli("ingest", str(trips))[0] == 0
    spec = ModelSpec(weights=tiny_openclip, device="cpu")
    app = create_app(ServerSettings(db=str(cli.db)), lambda: (load_encoder(spec), spec))
    with RunningServer(app) as srv, httpx.Client(base_url=srv.wait_ready().url, timeout=30) as c:
        body = {"text": "a photo", "limit": 10, "filter": {"taken_at": {"gte": "2024-06-01"}, "width": {"lt": 500}}}
        got = c.post("/api/v1/search", json=body).json()["results"]
        assert {r["metadata"]["path"].rsplit("/", 1)[-1] for r in got} == {"sydney.jpg"}
        any_case = {**body, "filter": {"camera_make": {"iexact": "CANON"}}}
        got = c.post("/api/v1/search", json=any_case).json()["results"]
        assert {r["metadata"]["path"].rsplit("/", 1)[-1] for r in got} == {"paris.jpg", "home.png"}
        bad = c.post("/api/v1/search", json={**body, "filter": {"width": {"ge": 5}}})
        assert bad.status_code == 422
        with open(trips / "paris.jpg", "rb") as f:
            form = {"filter": json.dumps({"camera_make": "Canon"}), "limit": "10"}
            got = c.post("/api/v1/images/search", files={"file": f}, data=form).json()["results"]
        assert {r["metadata"]["path"].rsplit("/", 1)[-1] for r in got} == {"paris.jpg", "home.png"}
        photo = (trips / "paris.jpg").read_bytes()
        bad = c.post("/api/v1/images/search", files={"file": photo}, data={"filter": "[1"})
        assert bad.status_code == 400 and "'filter' field must be a JSON object" in bad.json()["error"]["message"]


# -- 11. filters compare typed values ------------------------------------------------------------
def test_a_numeric_filter_from_the_command_line_matches(cli, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((40, 500, 3), 90, np.uint8)).save(photos / "wide.jpg")
    Image.fromarray(np.full((40, 300, 3), 90, np.uint8)).save(photos / "narrow.jpg")
    assert cli("ingest", str(photos))[0] == 0
    code, out, err = cli("search", "a photo", "--filter", "width=500", "--json")
    assert code == 0, err
    hits = [json.loads(line) for line in out.splitlines()]
    assert [Path(h["path"]).name for h in hits] == ["wide.jpg"]
