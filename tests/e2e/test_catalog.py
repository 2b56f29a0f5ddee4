"""Product catalogs end to end: CSV/TSV/JSON Lines/Parquet rows with image URLs, fetched from a
real HTTP server on 127.0.0.1 (images, 404s, 500s that recover, timeouts, HTML, oversized
bodies, redirect loops) into the download cache; filters and samples; keyword and hybrid search;
similar items; the seed-compatible export."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

import clipsearch
from clipsearch import IngestOptions
from clipsearch.catalog import CatalogOptions, CatalogSource
from clipsearch.download_cache import DownloadCache, DownloadSettings, download_all
from clipsearch.errors import UsageError
from clipsearch.fetch import FetchPolicy
from clipsearch.search import fuse_rankings
from clipsearch.store import Hit, Item, SQLiteStore

from ..conftest import interrupt_mid_run, noise_png


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def ingest_json(cli, *args) -> tuple[int, dict, str]:
    code, out, err = cli("ingest", *args, "--json")
    return code, json.loads(out), err


def items_of(db: Path, namespace: str = "default") -> dict[str, dict]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, metadata FROM items WHERE namespace = ?", (namespace,)).fetchall()
    return {i: json.loads(m) for i, m in rows}


def failures_of(cli) -> dict[str, str]:
    code, out, _ = cli("failures", "--json")
    assert code == 0
    return {f["id"]: f["reason"] for f in map(json.loads, out.splitlines())}


PRODUCTS = [
    ("P1", "Red summer dress", "red, dress, cotton", "BigClient"),
    ("P2", "Blue evening dress", "blue, dress, silk", "BigClient"),
    ("P3", "Red leather boots", "red, boots, leather", "SmallShop"),
    ("P4", "Green wool scarf", "green, scarf, winter", "SmallShop"),
    ("P5", "Black running shoes", "black, shoes, sport", "BigClient"),
    ("P6", "White linen shirt", "white, shirt, summer", "OtherCo"),
]


@pytest.fixture
def products(image_server, tmp_path) -> Path:
    rows = [
        {"product_id": pid, "image_url": f"{image_server.url}/noise/{i}.png", "title": t, "tags": g, "client": c}
        for i, (pid, t, g, c) in enumerate(PRODUCTS)
    ]
    return write_csv(tmp_path / "products.csv", rows)


CATALOG_ARGS = ["--id-column", "product_id", "--image-column", "image_url", "--text-columns", "title,tags"]


# -- reading tables ----------------------------------------------------------------------------
def test_every_table_format_gives_the_same_items(tmp_path):
    rows = [
        {"sku": "A1", "image": "https://example.com/a.jpg", "title": "Apple", "client": "X", "type": "fruit"},
        {"sku": "B2", "image": "imgs/b.jpg", "title": "Banana", "client": "Y", "type": ""},
    ]
    write_csv(tmp_path / "c.csv", rows)
    write_csv(tmp_path / "c.tsv", rows, delimiter="\t")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    options = CatalogOptions(id_column="sku", text_columns=["title"])
    seen = []
    for ext in ("csv", "tsv", "jsonl", "parquet"):
        items = list(CatalogSource(tmp_path / f"c.{ext}", options))
        seen.append([(it.id, it.url, it.path, it.text, it.fingerprint, it.metadata["client"]) for it in items])
        assert items[0].metadata["type"] == "fruit" and items[0].metadata["catalog"] == f"c.{ext}"
    assert all(s == seen[0] for s in seen)
    (a_id, a_url, a_path, a_text, _, _), (b_id, b_url, b_path, _, _, _) = seen[0]
    assert (a_id, a_url, a_path, a_text) == ("A1", "https://example.com/a.jpg", None, "Apple")
    assert (b_id, b_url, b_path) == ("B2", None, (tmp_path / "imgs/b.jpg").resolve())


def test_missing_columns_and_formats_fail_with_one_line(tmp_path, cli):
    path = write_csv(tmp_path / "c.csv", [{"sku": "A", "image_url": "http://x/a.jpg"}])
    with pytest.raises(UsageError, match=r"no column 'product_id'.*id_column.*sku, image_url"):
        CatalogSource(path, CatalogOptions(id_column="product_id"))
    with pytest.raises(UsageError, match=r"no column 'title'.*text_columns"):
        CatalogSource(path, CatalogOptions(id_column="sku", text_columns=["title"]))
    (tmp_path / "c.xlsx").write_text("x")
    with pytest.raises(UsageError, match=r"unknown table format '\.xlsx'"):
        CatalogSource(tmp_path / "c.xlsx", CatalogOptions())
    code, _, err = cli("ingest", f"catalog:{path}", "--id-column", "sku", "--filter", "clinet=Big")
    assert code == 2 and "no column 'clinet'" in err and "--filter" in err and "Traceback" not in err
    code, _, err = cli("ingest", str(path))
    assert code == 2 and f"use catalog:{path}" in err


# -- downloads ---------------------------------------------------------------------------------
def test_downloads_retry_what_may_recover_and_cache_what_arrived(image_server, tmp_path):
    cache = DownloadCache(tmp_path / "cache")
    settings = DownloadSettings(concurrency=4, retries=2, backoff=0.01, policy=FetchPolicy(True, 2.0))
    base = image_server.url
    urls = [f"{base}/noise/900.png", f"{base}/status/404", f"{base}/flaky/dl-test", f"{base}/noise/900.png?again"]
    before = dict(image_server.hits)
    results = download_all(cache, urls, settings)
    ok, missing, flaky, same_bytes = results
    assert ok.path is not None and ok.path.read_bytes() == noise_png(900)
    assert missing.path is None and "HTTP 404" in missing.error
    assert image_server.hits["/status/404"] - before.get("/status/404", 0) == 1  # a 404 is not retried
    assert flaky.path is not None and image_server.hits["/flaky/dl-test"] == 3  # two 500s, then the image
    assert same_bytes.path == ok.path  # content-addressed: one file for equal bytes
    hits = sum(image_server.hits.values())
    again = download_all(cache, [urls[0], urls[2]], settings)
    assert [r.path for r in again] == [ok.path, flaky.path]
    assert sum(image_server.hits.values()) == hits  # cached: no request at all
    cache.close()


def test_a_slow_download_holds_up_nothing_but_itself(image_server, tmp_path):
    from clipsearch.download_cache import Downloader

    cache = DownloadCache(tmp_path / "cache")
    settings = DownloadSettings(concurrency=4, retries=0, policy=FetchPolicy(True, 5.0))
    with Downloader(cache, settings) as downloader:
        downloader.submit("slow", f"{image_server.url}/slow?s=1.5")
        for i in range(6):
            downloader.submit(i, f"{image_server.url}/noise/{910 + i}.png")
        order = [downloader.get(timeout=10).key for _ in range(7)]
    assert order[-1] == "slow" and sorted(order[:-1]) == list(range(6))
    cache.close()


def test_a_hanging_url_costs_its_deadline_once_not_once_per_attempt(image_server, tmp_path):
    """--download-timeout bounds a URL in all: four attempts of a host that never answers used
    to cost four timeouts (and back-offs) each."""
    cache = DownloadCache(tmp_path / "cache")
    settings = DownloadSettings(concurrency=4, retries=3, backoff=0.01, policy=FetchPolicy(True, 1.5))
    started = time.monotonic()
    (result,) = download_all(cache, [f"{image_server.url}/slow?s=30&hang"], settings)
    elapsed = time.monotonic() - started
    assert result.path is None and "timed out" in result.error
    assert 1.4 < elapsed < 3.0, elapsed
    cache.close()


def test_a_url_shared_by_rows_in_flight_is_fetched_once(image_server, tmp_path):
    cache = DownloadCache(tmp_path / "cache")
    shared, dead = f"{image_server.url}/slow?s=0.5&shared", f"{image_server.url}/status/404?shared"
    before = dict(image_server.hits)
    results = download_all(cache, [shared, dead, shared, dead, shared], DownloadSettings(retries=0))
    assert [r.key for r in results] == [0, 1, 2, 3, 4]
    assert results[0].path is not None and results[0].path == results[2].path == results[4].path
    assert results[1].error == results[3].error and "HTTP 404" in results[1].error
    fetched = {p: n - before.get(p, 0) for p, n in image_server.hits.items() if n != before.get(p, 0)}
    assert fetched == {"/slow": 1, "/status/404": 1}
    cache.close()


def test_a_failed_url_is_remembered_across_namespaces_until_retry_failed(cli, image_server, tmp_path):
    dead = f"{image_server.url}/status/410?remembered"
    catalog = write_csv(tmp_path / "c.csv", [{"id": "A", "image_url": dead}])
    before = image_server.hits["/status/410"]
    code, report, _ = ingest_json(cli, f"catalog:{catalog}")
    assert code == 1 and image_server.hits["/status/410"] == before + 1
    code, report, _ = ingest_json(cli, f"catalog:{catalog}", "-n", "second")  # same store, same cache
    assert code == 1 and image_server.hits["/status/410"] == before + 1
    reason = report["failures"][0]["reason"]
    assert "HTTP 410" in reason and "not fetched again for a while" in reason
    code, report, _ = ingest_json(cli, f"catalog:{catalog}", "-n", "third", "--retry-failed")
    assert code == 1 and image_server.hits["/status/410"] == before + 2


# -- catalog ingest ----------------------------------------------------------------------------
def test_catalog_ingest_records_every_failure_and_never_fetches_twice(cli, image_server, tmp_path):
    base = image_server.url
    good = [{"id": f"G{i}", "image_url": f"{base}/noise/{100 + i}.png", "client": "A"} for i in range(5)]
    local = tmp_path / "local.png"
    local.write_bytes(noise_png(199))
    bad = {
        "404": f"{base}/status/404",
        "flaky": f"{base}/flaky/catalog-test",  # two 500s, then an image: retried, embedded
        "slow": f"{base}/slow?s=10",
        "html": f"{base}/html",
        "big": f"{base}/big",
        "loop": f"{base}/redirect-loop",
        "empty": "",
        "local": "local.png",  # a path, relative to the catalog
    }
    rows = good + [{"id": k, "image_url": v, "client": "B"} for k, v in bad.items()]
    catalog = write_csv(tmp_path / "cat.csv", rows)
    # a deadline far above what a loaded CI machine needs for a small image and the flaky route's
    # two back-offs, far below the slow route
    args = [f"catalog:{catalog}", "--concurrency", "8", "--download-timeout", "4", "--retries", "2"]
    args += ["--max-download-mb", "1"]
    code, report, _ = ingest_json(cli, *args)
    assert code == 1
    assert report["embedded"] == 7 and report["failed"] == 6
    reasons = failures_of(cli)
    assert "HTTP 404" in reasons["404"]
    assert "timed out" in reasons["slow"]
    assert "not an image (content-type text/html)" in reasons["html"]
    assert "over the 1 MiB limit" in reasons["big"]
    assert "redirected more than" in reasons["loop"]
    assert reasons["empty"] == "line 13 has no image_url"  # the header is line 1
    stored = items_of(cli.db)
    assert set(stored) == {"G0", "G1", "G2", "G3", "G4", "flaky", "local"}
    assert stored["G0"]["url"] == good[0]["image_url"] and stored["G0"]["client"] == "A"
    assert Path(stored["G0"]["path"]).read_bytes() == noise_png(100)  # the cached file
    assert stored["local"]["path"] == str(local)

    # the same run again: nothing changed, so nothing is fetched or embedded
    hits = sum(image_server.hits.values())
    code, report, _ = ingest_json(cli, *args)
    assert (report["embedded"], report["skipped"], report["previously_failed"]) == (0, 7, 6)
    assert sum(image_server.hits.values()) == hits
    # --retry-failed asks again for what failed, and only that
    not_found = image_server.hits["/status/404"]
    code, report, _ = ingest_json(cli, *args, "--retry-failed", "--retries", "0")
    assert (report["embedded"], report["failed"]) == (0, 6) and image_server.hits["/status/404"] == not_found + 1
    assert all(image_server.hits[f"/noise/{100 + i}.png"] == 1 for i in range(5))
    hits = sum(image_server.hits.values())

    # a new database on the same cache: every image that arrived comes from the cache
    cache = f"{cli.db}-cache"
    code, report, _ = ingest_json(cli, *args, "--db", tmp_path / "other.db", "--cache-dir", cache, "--offline")
    assert report["embedded"] == 7 and sum(image_server.hits.values()) == hits
    seen = dict(image_server.hits)
    with sqlite3.connect(tmp_path / "other.db") as conn:
        offline = dict(conn.execute("SELECT id, reason FROM failures"))
    assert offline["404"] == "not cached (the run was --offline)"
    # ... and a later run that may download tries those again without --retry-failed, except
    # the URLs the shared cache remembers as failed a moment ago: those it answers at once
    code, report, _ = ingest_json(cli, *args, "--db", tmp_path / "other.db", "--cache-dir", cache)
    assert report["previously_failed"] == 1 and report["failed"] == 5  # the row with no URL stays failed
    assert {p: n - seen.get(p, 0) for p, n in image_server.hits.items() if n != seen.get(p, 0)} == {}
    assert all("not fetched again for a while" in f["reason"] for f in report["failures"])


def test_a_thousand_rows_with_fifty_bad_urls(cli, image_server, tmp_path):
    base = image_server.url
    rows = [
        {"id": f"R{i:04d}", "image_url": f"{base}/status/404?{i}" if i % 20 == 7 else f"{base}/noise/{2000 + i}.png"}
        for i in range(1000)
    ]
    catalog = write_csv(tmp_path / "big.csv", rows)
    code, report, _ = ingest_json(cli, f"catalog:{catalog}", "--batch-size", "64")
    assert code == 1
    assert (report["embedded"], report["failed"]) == (950, 50)
    assert all("HTTP 404" in f["reason"] for f in report["failures"])
    assert len(items_of(cli.db)) == 950


def test_filters_sample_and_limit_select_rows(cli, products, tmp_path):
    code, report, _ = ingest_json(cli, f"catalog:{products}", *CATALOG_ARGS, "--filter", "client=BigClient")
    assert code == 0 and set(items_of(cli.db)) == {"P1", "P2", "P5"}

    def sample(seed: int, db: str) -> set[str]:
        ingest_json(cli, f"catalog:{products}", *CATALOG_ARGS, "--sample", "3", "--seed", str(seed), "--db", db)
        return set(items_of(Path(db)))

    first = sample(1, str(tmp_path / "s1.db"))
    assert len(first) == 3
    assert sample(1, str(tmp_path / "s2.db")) == first  # reproducible
    assert {frozenset(sample(seed, str(tmp_path / f"x{seed}.db"))) for seed in range(2, 6)} != {frozenset(first)}

    code, report, _ = ingest_json(cli, f"catalog:{products}", *CATALOG_ARGS, "--limit", "2", "--db", tmp_path / "l.db")
    assert report["embedded"] == 2


def test_a_repeated_id_uses_the_first_row_and_is_counted(cli, image_server, tmp_path):
    rows = [
        {"id": "A", "image_url": f"{image_server.url}/noise/40.png", "title": "first"},
        {"id": "A", "image_url": f"{image_server.url}/noise/41.png", "title": "second"},
        {"id": "B", "image_url": f"{image_server.url}/noise/42.png", "title": "other"},
    ]
    catalog = write_csv(tmp_path / "dup.csv", rows)
    code, report, _ = ingest_json(cli, f"catalog:{catalog}")
    assert (report["embedded"], report["repeated_ids"]) == (2, 1)
    assert items_of(cli.db)["A"]["title"] == "first"
    code, out, _ = cli("ingest", f"catalog:{catalog}")
    assert "1 repeated an id listed before (the first was used)" in out


def test_changed_rows_update_metadata_without_embedding_again(cli, products, image_server):
    ingest_json(cli, f"catalog:{products}", *CATALOG_ARGS)
    rows = list(csv.DictReader(products.open()))
    rows[0]["title"] = "Crimson summer gown"
    rows.append({**rows[1], "product_id": "P7", "image_url": f"{image_server.url}/noise/77.png"})
    write_csv(products, rows)
    code, report, _ = ingest_json(cli, f"catalog:{products}", *CATALOG_ARGS)
    assert (report["embedded"], report["skipped"]) == (1, 6)  # P7 is new; P1 only changed its title
    stored = items_of(cli.db)
    assert stored["P1"]["title"] == "Crimson summer gown" and stored["P1"]["sha256"]  # derived keys kept
    code, out, _ = cli("search", "gown", "--mode", "keyword", "--json")
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["P1"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_a_killed_catalog_ingest_resumes_without_loss_or_duplicates(tmp_path, tiny_openclip, image_server, sig):
    # each image 50 ms away, two at a time: the run lasts seconds, so the signal lands inside it
    # even on a loaded machine (the tiny model alone would finish before the poller looks)
    rows = [{"id": f"K{i:03d}", "image_url": f"{image_server.url}/noise/{3000 + i}.png?s=0.05"} for i in range(150)]
    catalog = write_csv(tmp_path / "kill.csv", rows)
    db = tmp_path / "kill.db"
    cmd = [sys.executable, "-m", "clipsearch.cli", "ingest", f"catalog:{catalog}", "--db", str(db)]
    cmd += ["--weights", str(tiny_openclip), "--batch-size", "4", "--concurrency", "2"]
    partial = interrupt_mid_run(cmd, db, sig)
    assert 12 <= partial < len(rows), f"the kill should land mid-run (stored {partial})"
    done = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["skipped"], report["embedded"]) == (partial, len(rows) - partial)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT id) FROM items").fetchone() == (150, 150)


# -- keyword, hybrid, text vectors ---------------------------------------------------------------
def hit_ids(out: str) -> list[str]:
    return [json.loads(line)["id"] for line in out.splitlines()]


def test_keyword_search_ranks_rows_that_have_every_word_first(cli, products):
    ingest_json(cli, f"catalog:{products}", *CATALOG_ARGS)
    code, out, _ = cli("search", "red dress", "--mode", "keyword", "--json")
    ids = hit_ids(out)
    assert ids[0] == "P1" and set(ids) == {"P1", "P2", "P3"}  # both words, then either
    _, out, _ = cli("search", "dress", "--mode", "keyword", "--filter", "client=BigClient", "--json")
    assert set(hit_ids(out)) == {"P1", "P2"}
    _, out, _ = cli("search", "leather", "--mode", "keyword", "--json")
    assert hit_ids(out) == ["P3"]
    _, out, _ = cli("search", "SmallShop", "--mode", "keyword", "--json")  # other metadata is indexed too
    assert set(hit_ids(out)) == {"P3", "P4"}
    _, out, _ = cli("search", 'red" OR NEAR(', "--mode", "keyword", "--json")  # never parsed as FTS syntax
    assert set(hit_ids(out)) == {"P1", "P3"}
    code, _, err = cli("search", "!!!", "--mode", "keyword")
    assert code == 2 and "no words" in err


def test_hybrid_is_the_reciprocal_rank_fusion_of_its_rankings(cli, products):
    ingest_json(cli, f"catalog:{products}", *CATALOG_ARGS)
    rankings = {}
    for mode in ("vector", "keyword", "hybrid"):
        _, out, _ = cli("search", "red dress", "--mode", mode, "--json", "--limit", "6")
        rankings[mode] = [(r["id"], r["score"]) for r in map(json.loads, out.splitlines())]
    expected: dict[str, float] = {}
    for mode in ("vector", "keyword"):
        for rank, (item_id, _) in enumerate(rankings[mode], 1):
            expected[item_id] = expected.get(item_id, 0.0) + 1 / (60 + rank)
    assert [i for i, _ in rankings["hybrid"]] == sorted(expected, key=lambda i: (-expected[i], i))
    assert all(abs(score - expected[i]) < 1e-6 for i, score in rankings["hybrid"])


def test_fuse_rankings_rewards_agreement():
    def hits(*ids: str) -> list[Hit]:
        return [Hit(Item(i, "default", {}), 0.0) for i in ids]

    fused = fuse_rankings([hits("a", "b", "c"), hits("c", "b", "x"), hits("b")], limit=3)
    assert [h.item.id for h in fused] == ["b", "c", "a"]
    assert fused[0].score == pytest.approx(1 / 62 + 1 / 62 + 1 / 61)


def test_embedded_titles_find_a_product_by_its_text(cli, products, encoder):
    code, _, _ = ingest_json(cli, f"catalog:{products}", *CATALOG_ARGS, "--embed-text")
    assert code == 0
    store = SQLiteStore(cli.db)
    try:
        assert store.has_text_vectors("default")
        query = encoder.embed_texts(["Green wool scarf green, scarf, winter"])
        hit = store.search("default", query, 1, field="text")[0][0]
        assert hit.item.id == "P4" and hit.score == pytest.approx(1.0, abs=1e-4)
    finally:
        store.close()
    _, out, _ = cli("search", "Green wool scarf green, scarf, winter", "--mode", "hybrid", "--json")
    assert hit_ids(out)[0] == "P4"
    # without --embed-text the next run drops the text vectors: the item reflects the last run
    ingest_json(cli, f"catalog:{products}", *CATALOG_ARGS)
    store = SQLiteStore(cli.db)
    assert not store.has_text_vectors("default")
    store.close()
    code, _, err = cli("ingest", f"catalog:{products}", "--id-column", "product_id", "--embed-text")
    assert code == 2 and "--embed-text needs --text-columns" in err


# -- similar and export ------------------------------------------------------------------------
def test_similar_leaves_the_item_out_and_can_stay_within_a_client(cli, products):
    ingest_json(cli, f"catalog:{products}", *CATALOG_ARGS)
    code, out, _ = cli("similar", "P1", "--json", "--limit", "10")
    ids = hit_ids(out)
    assert code == 0 and "P1" not in ids and len(ids) == 5
    _, out, _ = cli("similar", "P1", "--same-filter", "client", "--json")
    assert set(hit_ids(out)) == {"P2", "P5"}
    code, out, _ = cli("similar", "P3")
    assert code == 0 and "P4" in out and "rank" in out  # a table of ids and image URLs
    code, _, err = cli("similar", "nope")
    assert code == 2 and "no item 'nope'" in err
    # the library names the argument; the CLI words it as the flag
    code, _, err = cli("similar", "P1", "--same-filter", "season")
    assert code == 2 and "item 'P1' has no season to match (--same-filter)" in err


def test_seed_compatible_export_layout(cli, products, tmp_path):
    ingest_json(cli, f"catalog:{products}", *CATALOG_ARGS)
    out_dir = tmp_path / "seed"
    code, _, _ = cli("export", "--format", "seed-compatible", "--out", out_dir)
    assert code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "embeddings.npy",
        "index.faiss",
        "index_ids.json",
        "manifest.json",
        "metadata.json",
    ]
    matrix = np.load(out_dir / "embeddings.npy")
    metadata = json.loads((out_dir / "metadata.json").read_text())
    ids = json.loads((out_dir / "index_ids.json").read_text())
    assert matrix.dtype == np.float32 and matrix.shape == (6, 32)
    assert [m["id"] for m in metadata] == ids and sorted(ids) == [p[0] for p in PRODUCTS]
    assert metadata[ids.index("P3")]["title"] == "Red leather boots"
    index = faiss.read_index(str(out_dir / "index.faiss"))
    assert index.ntotal == 6
    _, found = index.search(matrix, 1)
    assert list(found[:, 0]) == list(range(6))  # row i's nearest is row i
    store = SQLiteStore(cli.db)
    vectors = store.get_vectors("default", ids)
    store.close()
    assert np.allclose(matrix, np.stack([vectors[i] for i in ids]))
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["count"] == 6 and manifest["dimensions"] == 32
    code, _, err = cli("export", "--format", "seed-compatible")
    assert code == 2 and "needs --out DIR" in err


# -- 2. downloaded images are stored under absolute paths --------------------------------------
def test_downloaded_images_have_absolute_paths_with_a_relative_db(cli, image_server, tmp_path, monkeypatch):
    rows = [{"product_id": f"P{i}", "image_url": f"{image_server.url}/noise/{600 + i}.png"} for i in range(3)]
    catalog = write_csv(tmp_path / "c.csv", rows)
    monkeypatch.chdir(tmp_path)
    code, report, _ = ingest_json(cli, f"catalog:{catalog}", "--id-column", "product_id", "--db", "rel.db")
    assert code == 0 and report["embedded"] == 3
    monkeypatch.chdir(tmp_path.parent)  # e.g. `serve` started from elsewhere
    with clipsearch.open(tmp_path / "rel.db") as collection:
        paths = [it.metadata["path"] for it in collection.get(["P0", "P1", "P2"])]
    assert all(os.path.isabs(p) and Path(p).is_file() for p in paths), paths


# -- 6. a slow URL does not hold the rest of a batch -------------------------------------------
def test_ready_items_are_committed_while_a_slow_url_downloads(image_server, tmp_path, tiny_openclip):
    rows = [{"product_id": f"F{i}", "image_url": f"{image_server.url}/noise/{700 + i}.png"} for i in range(5)]
    rows.append({"product_id": "SLOW", "image_url": f"{image_server.url}/slow?s=5"})
    catalog = write_csv(tmp_path / "c.csv", rows)
    committed: list[tuple[float, int]] = []
    started = time.monotonic()
    with clipsearch.open(tmp_path / "s.db", weights=tiny_openclip) as collection:
        collection.encoder  # noqa: B018 - loaded before the clock matters
        report = collection.ingest(
            [f"catalog:{catalog}"],
            IngestOptions(batch_size=32),
            catalog=CatalogOptions("product_id"),
            progress=lambda done, total: committed.append((time.monotonic() - started, done)),
        )
    finished = time.monotonic() - started
    assert report.embedded == 6
    # the five fast rows were committed seconds before the slow one arrived, not with it
    first_five = min(t for t, done in committed if done >= 5)
    assert first_five < finished - 2.5, (first_five, finished, committed)


def test_repeated_ids_count_only_selected_rows(cli, image_server, tmp_path):
    url = f"{image_server.url}/noise"
    rows = [
        {"product_id": "A", "image_url": f"{url}/801.png", "client": "keep"},
        {"product_id": "B", "image_url": f"{url}/802.png", "client": "drop"},
        {"product_id": "B", "image_url": f"{url}/803.png", "client": "drop"},
    ]
    catalog = write_csv(tmp_path / "c.csv", rows)
    code, report, _ = ingest_json(cli, f"catalog:{catalog}", "--id-column", "product_id", "--filter", "client=keep")
    assert code == 0 and report["embedded"] == 1 and report["repeated_ids"] == 0


def test_failures_are_counted_by_kind_and_name_the_row(cli, image_server, tmp_path):
    base = image_server.url
    rows = [{"product_id": f"G{i}", "image_url": f"{base}/noise/{300 + i}.png", "title": "ok"} for i in range(3)]
    rows += [{"product_id": f"M{i}", "image_url": f"{base}/status/404?kind{i}", "title": "gone"} for i in range(3)]
    rows += [
        {"product_id": "H", "image_url": f"{base}/html", "title": "a page"},
        {"product_id": "C", "image_url": f"{base}/cut", "title": "cut"},
        {"product_id": "Q", "image_url": f"{base}/noise/310.png", "title": "two\nlines"},  # quoted over two lines
        {"product_id": "E", "image_url": "", "title": "no url"},
    ]
    catalog = write_csv(tmp_path / "c.csv", rows)
    args = [f"catalog:{catalog}", "--id-column", "product_id", "--retries", "0"]
    code, _, err = cli("ingest", *args)
    assert code == 1
    counts = next(line for line in err.splitlines() if line.startswith("failed by kind: "))
    assert counts.startswith("failed by kind: HTTP 404: 3, ")  # most first; ties as they came
    assert set(counts.split(": ", 1)[1].split(", ")) == {
        "HTTP 404: 3", "not an image: 1", "connection broken mid-body: 1", "no image_url: 1"
    }  # fmt: skip
    assert f"failed: {base}/status/404?kind0: answered HTTP 404 (id M0)" in err
    assert "the server closed the connection before the whole response arrived" in err
    assert "RemoteProtocolError" not in err
    assert "line 12 has no image_url" in err  # the header is line 1; the quoted title spans 10-11

    code, report, _ = ingest_json(cli, *args, "--retry-failed")
    assert report["failures_by_kind"] == {"HTTP 404": 3, "not an image": 1, "connection broken mid-body": 1,
                                          "no image_url": 1}  # fmt: skip
    assert {f["kind"] for f in report["failures"]} == set(report["failures_by_kind"])

    code, out, _ = cli("failures")
    assert code == 0 and "6 failed; by kind: HTTP 404: 3" in out
    line = next(row for row in out.splitlines() if "kind1" in row)
    assert "M1" in line and line.count(f"{base}/status/404?kind1") == 1
    code, out, _ = cli("failures", "--json")
    listed = {f["id"]: f for f in map(json.loads, out.splitlines())}
    assert set(listed) == {"M0", "M1", "M2", "H", "C", "E"}
    assert listed["M0"]["attempts"] == 2 and listed["M0"]["kind"] == "HTTP 404"
    assert listed["M0"]["metadata"]["title"] == "gone" and listed["M0"]["first_failed_at"]
    assert {"sha256", "size", "fingerprint", "last_failed_at", "namespace", "source"} <= set(listed["M0"])


def test_a_404_line_names_the_url_once(cli, image_server, tmp_path):
    missing = f"{image_server.url}/status/404"
    catalog = write_csv(tmp_path / "c.csv", [{"product_id": "X", "image_url": missing}])
    code, _, err = cli("ingest", f"catalog:{catalog}", "--id-column", "product_id")
    assert code == 1 and f"failed: {missing}: answered HTTP 404" in err and err.count(missing) == 1


def test_scheduled_runs_log_progress_and_may_tolerate_failures(cli, image_server, tmp_path):
    base = image_server.url
    rows = [{"id": f"G{i}", "image_url": f"{base}/noise/{400 + i}.png", "client": "Small"} for i in range(10)]
    rows += [{"id": "S", "image_url": f"{base}/slow?s=1&progress", "client": "Big"}]
    rows += [{"id": "M", "image_url": f"{base}/status/404?rate", "client": "Big"}]
    catalog = write_csv(tmp_path / "c.csv", rows)
    # no terminal (the test's pipes): plain lines, as a cron job or a CI log would keep them
    code, _, err = cli("ingest", f"catalog:{catalog}", "--progress-every", "0.2")
    lines = [line for line in err.splitlines() if line.startswith("ingest: ")]
    assert code == 1 and lines and all(" of 12 (" in line and "items/s" in line for line in lines)
    code, _, err = cli("ingest", f"catalog:{catalog}", "-n", "quiet", "--progress", "none", "--progress-every", "0.2")
    assert not [line for line in err.splitlines() if line.startswith("ingest: ")]

    # one failure in 12 (8.3%): over 5%, within 10%
    code, _, err = cli("ingest", f"catalog:{catalog}", "--max-failure-rate", "5%")
    assert code == 1 and "warning" not in err
    code, _, err = cli("ingest", f"catalog:{catalog}", "--max-failure-rate", "0.1")
    assert code == 0 and "warning: 1 of 12 items failed (8.3%), within --max-failure-rate 10.0%: exit 0" in err
    code, _, err = cli("ingest", f"catalog:{catalog}", "--max-failure-rate", " 10% ")  # as an env var may hold it
    assert code == 0 and "within --max-failure-rate 10.0%" in err
    code, _, err = cli("ingest", f"catalog:{catalog}", "--max-failure-rate", "lots")
    assert code == 2 and "like 5% or 0.05" in err


def test_a_filter_value_that_matches_nothing_lists_the_values(cli, image_server, tmp_path):
    rows = [{"id": f"R{i}", "image_url": f"{image_server.url}/noise/{i}.png", "client": c}
            for i, c in enumerate(["Small", "Mid", "Big", "Big"])]  # fmt: skip
    catalog = write_csv(tmp_path / "c.csv", rows)
    code, _, err = cli("ingest", f"catalog:{catalog}", "--filter", "client=small")
    assert code == 2 and "no item matches the filter on 'client' (of 4); its values: Big, Small, Mid" in err
    assert "did you mean 'Small'?" in err and "(--filter)" in err
    code, _, err = cli("ingest", f"catalog:{catalog}", "--filter", "client=Small", "--filter", "id=R1")
    assert code == 2 and "no item matches all of the filters together" in err


def test_dry_run_counts_what_would_happen_and_does_nothing(cli, image_server, tmp_path):
    base = image_server.url
    rows = [{"id": f"G{i}", "image_url": f"{base}/noise/{500 + i}.png", "client": "A"} for i in range(4)]
    rows += [{"id": "M", "image_url": f"{base}/status/404?dry", "client": "A"}]
    catalog = write_csv(tmp_path / "c.csv", rows)
    # no database yet: everything is new, and none is made
    code, out, _ = cli("ingest", f"catalog:{catalog}", "--dry-run", "--json")
    assert code == 0 and not cli.db.exists()
    assert (json.loads(out)["new"], json.loads(out)["to_fetch"]) == (5, 5)
    cli("ingest", f"catalog:{catalog}", "--retries", "0")

    rows[0]["client"] = "B"  # changed: read again
    rows += [{"id": f"N{i}", "image_url": f"{base}/noise/{520 + i}.png", "client": "C"} for i in range(3)]
    rows += [{"id": "E", "image_url": "", "client": "C"}, {"id": "G1", "image_url": "x", "client": "A"}]
    rows += [{"id": "L", "image_url": f"{base}/noise/500.png?again", "client": "C"}]
    catalog = write_csv(tmp_path / "c.csv", rows)
    before, size = dict(image_server.hits), cli.db.stat().st_size
    code, out, _ = cli("ingest", f"catalog:{catalog}", "--dry-run", "--json", "--limit", "2")
    preview = json.loads(out)
    assert code == 0 and image_server.hits == before and cli.db.stat().st_size == size
    expected = {
        "listed": 11, "selected": 10, "repeated_ids": 1, "unchanged": 3, "previously_failed": 1,
        "new": 5, "changed": 1, "files": 0, "cached": 1, "to_fetch": 4, "will_fail": {"no image_url": 1}, "limit": 2,
    }  # fmt: skip
    assert preview == expected
    code, out, _ = cli("ingest", f"catalog:{catalog}", "--dry-run", "--filter", "client=C")
    assert code == 0 and "dry run: 11 items listed, 5 selected (6 left out by --filter or --sample)" in out
    assert "embed up to 5: 5 new, 0 changed" in out and "fail at once: no image_url: 1" in out
    # the 404 is remembered by the download cache: a --retry-failed run would fetch it, a new namespace not
    code, out, _ = cli("ingest", f"catalog:{catalog}", "--dry-run", "--json", "-n", "other")
    assert json.loads(out)["will_fail"] == {"HTTP 404 (failed recently)": 1, "no image_url": 1}


def test_info_counts_items_by_a_metadata_value(cli, products):
    cli("ingest", f"catalog:{products}", *CATALOG_ARGS)
    code, out, _ = cli("info", "--by", "client", "--json")
    data = json.loads(out)
    assert code == 0 and data["items"] == 6
    assert data["counts"] == [
        {"value": "BigClient", "items": 3}, {"value": "SmallShop", "items": 2}, {"value": "OtherCo", "items": 1}
    ]  # fmt: skip
    code, out, _ = cli("info", "--by", "client")
    assert code == 0 and "BigClient" in out and "50.0%" in out
    code, _, err = cli("info", "--by", "colour")
    assert code == 2 and "no item has the metadata key 'colour'; their keys:" in err and "client" in err


def test_search_by_a_vector_from_a_file_or_stdin(cli, products, tmp_path):
    from ..conftest import stored_vectors

    cli("ingest", f"catalog:{products}", *CATALOG_ARGS)
    vector = stored_vectors(cli.db)["P3"]
    np.save(tmp_path / "q.npy", vector[None, :])
    (tmp_path / "q.json").write_text(json.dumps({"data": [{"embedding": vector.tolist()}]}))
    for args, stdin in [
        ((tmp_path / "q.npy",), None),
        ((tmp_path / "q.json",), None),
        (("-",), json.dumps(vector.tolist())),
    ]:
        code, out, _ = cli("search", "--vector", *args, "--json", "--limit", "2", input=stdin)
        assert code == 0 and json.loads(out.splitlines()[0])["id"] == "P3", args
    code, _, err = cli("search", "--vector", "-", input="[1, 2")
    assert code == 2 and "neither a .npy array nor JSON" in err
    code, _, err = cli("search", "--vector", "-", input="[1.0, 2.0]")
    assert code == 2 and "dimensions" in err
    code, _, err = cli("search", "red", "--vector", tmp_path / "q.npy")
    assert code == 2 and "exactly one" in err
