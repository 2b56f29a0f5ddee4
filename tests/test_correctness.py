"""What trying every README command found (issue "Store and CLI correctness"): each test here
failed before its fix. Stale indexes, relative paths, silently skipped files, export errors,
explicit index kinds, slow URLs holding batches, no-op runs that load a model, and hints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import clipsearch
from clipsearch import IngestOptions
from clipsearch.catalog import CatalogOptions

from .conftest import make_tiny_openclip, noise_images, write_photos
from .test_catalog import ingest_json, write_csv


# -- 1. an index is tied to its database and namespace ------------------------------------------
def test_an_index_left_by_a_replaced_database_is_not_trusted(cli, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    noise_images(first, 6, seed=1)
    noise_images(second, 6, seed=2)
    assert cli("ingest", first)[0] == 0
    for suffix in ("", "-wal", "-shm"):  # `rm clipsearch.db*` leaves the -index/ folder
        Path(f"{cli.db}{suffix}").unlink(missing_ok=True)
    assert cli("ingest", second)[0] == 0
    code, out, _ = cli("info", "--json")
    assert json.loads(out)["namespaces"][0]["index"] == "flat"
    # each photo of the new database finds itself, never a photo of the old one
    for path in sorted(second.iterdir()):
        _, out, _ = cli("search", "--image", path, "--json", "--limit", "1")
        hit = json.loads(out)
        assert hit["path"] == str(path) and hit["score"] > 0.9999
    _, out, _ = cli("search", "--image", first / "img_0000.png", "--json", "--limit", "6")
    assert all(json.loads(line)["path"].startswith(str(second)) for line in out.splitlines())


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


# -- 3. broken files are failures with a reason ---------------------------------------------------
def test_dangling_links_loops_and_fifos_are_recorded(cli, tmp_path):
    folder = tmp_path / "photos"
    write_photos(folder, ["coffee"])
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    os.mkfifo(folder / "pipe.jpg")
    code, out, _ = cli("ingest", folder, "--json")
    report = json.loads(out)
    assert code == 1 and report["embedded"] == 1 and report["failed"] == 3
    reasons = {Path(f["source"]).name: f["reason"] for f in report["failures"]}
    assert reasons == {
        "dangling.jpg": "file does not exist",
        "loop.jpg": "file does not exist",
        "pipe.jpg": "not a regular file",
    }
    # and a second run does not try them again (nor block on the FIFO)
    code, out, _ = cli("ingest", folder, "--json")
    assert json.loads(out)["previously_failed"] == 3


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
    code, out, _ = cli("index", "build", "--kind", "hnsw")
    assert code == 0 and "hnsw index over 6 vectors" in out
    assert json.loads(cli("info", "--json")[1])["namespaces"][0]["index"] == "hnsw"
    code, out, _ = cli("index", "build", "--kind", "flat")
    assert code == 0 and "flat index over 6 vectors" in out
    _, out, _ = cli("search", "--image", photos / "rocket.jpg", "--json", "--limit", "1")
    assert json.loads(out)["path"] == str(photos / "rocket.jpg")


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


# -- 7. nothing to do loads no model -------------------------------------------------------------
def test_a_no_op_rerun_loads_no_model(cli, photos):
    assert cli("ingest", photos)[0] == 0
    code = f"""
import json, sys
import clipsearch
with clipsearch.open({str(cli.db)!r}) as collection:
    report = collection.ingest([{str(photos)!r}])
print(json.dumps({{"report": report.as_dict(), "torch": "torch" in sys.modules}}))
"""
    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert result["report"]["skipped"] == 6 and result["report"]["embedded"] == 0
    assert not result["torch"]


def test_onednn_verdict_is_kept(tiny_openclip, monkeypatch, tmp_path):
    from clipsearch.encoders import ModelSpec, load_encoder, onednn

    if not onednn.available():
        pytest.skip("this PyTorch has no oneDNN linear kernel")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    checks = []
    real = onednn.accelerate
    monkeypatch.setattr(onednn, "accelerate", lambda *a, **k: checks.append(1) or real(*a, **k))
    first = load_encoder(ModelSpec(weights=tiny_openclip, device="cpu"))
    second = load_encoder(ModelSpec(weights=tiny_openclip, device="cpu"))
    assert first.onednn and second.onednn and len(checks) == 1  # checked once, then remembered
    assert list(json.loads((tmp_path / "cache" / "clipsearch" / "onednn.json").read_text()).values()) == [True]
    texts = ["a photo of a cat", "a red dress"]
    np.testing.assert_allclose(first.embed_texts(texts), second.embed_texts(texts), atol=1e-6)


# -- 8. hints and consistency --------------------------------------------------------------------
def test_a_list_file_without_its_kind_gets_a_hint(cli, photos, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photos / 'coffee.jpg'}\n")
    code, _, err = cli("ingest", listing)
    assert code == 2 and f"use image-list:{listing}" in err
    assert not cli.db.exists() or cli("info", "--json")[1].count('"namespace"') == 0


def test_a_filter_key_no_item_has_is_an_error(cli, photos):
    code, _, err = cli("ingest", photos, "--filter", "bogus=1")
    assert code == 2 and "no item has the metadata key 'bogus'" in err and "(--filter)" in err
    assert "filename" in err  # the keys there are


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


def test_embed_refuses_another_model_for_a_namespace(cli, photos, tmp_path):
    assert cli("ingest", photos, "-n", "b32")[0] == 0
    other = make_tiny_openclip(tmp_path / "other", seed=5)
    code, _, err = cli("embed", "--text", "a cat", "--weights", other, "-n", "b32")
    assert code == 2 and "holds vectors of" in err


def test_a_404_line_names_the_url_once(cli, image_server, tmp_path):
    missing = f"{image_server.url}/status/404"
    catalog = write_csv(tmp_path / "c.csv", [{"product_id": "X", "image_url": missing}])
    code, _, err = cli("ingest", f"catalog:{catalog}", "--id-column", "product_id")
    assert code == 1 and f"failed: {missing}: answered HTTP 404" in err and err.count(missing) == 1
