"""Ingest end to end through the CLI: search finds images, re-runs are incremental, failures are
recorded, a killed run resumes without duplicates, exit codes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ..conftest import interrupt_mid_run, noise_images, sample_photo, write_photos


def _count(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db) as conn:
        n = conn.execute("SELECT count(*) FROM items").fetchone()[0]
        distinct = conn.execute("SELECT count(DISTINCT namespace || '/' || id) FROM items").fetchone()[0]
    return n, distinct


def _summary(stdout: str) -> dict:
    return json.loads(stdout)


def test_ingest_then_search_by_image_finds_itself_first(cli, photos):
    code, out, _ = cli("ingest", photos, "--json")
    assert code == 0
    report = _summary(out)
    assert report["embedded"] == 6 and report["failed"] == 0
    for path in sorted(photos.iterdir()):
        code, out, _ = cli("search", "--image", path, "--json", "--limit", "3")
        assert code == 0
        first = json.loads(out.splitlines()[0])
        assert first["path"] == str(path)
        assert first["score"] > 0.9999  # decoded exactly as ingest decoded it
        assert set(first) == {"id", "score", "path", "metadata"}


def test_metadata_recorded_for_each_item(cli, photos):
    cli("ingest", photos)
    code, out, _ = cli("search", "--image", photos / "rocket.jpg", "--json", "--limit", "1")
    meta = json.loads(out)["metadata"]
    raw = (photos / "rocket.jpg").read_bytes()
    import hashlib

    assert meta["type"] == "image"
    assert meta["filename"] == "rocket.jpg" and meta["extension"] == "jpg"
    assert meta["path"] == str(photos / "rocket.jpg")
    assert meta["namespace"] == "default"
    assert (meta["width"], meta["height"]) == Image.open(photos / "rocket.jpg").size
    assert meta["sha256"] == hashlib.sha256(raw).hexdigest()


def test_text_search_prints_a_table(cli, photos):
    cli("ingest", photos)
    code, out, _ = cli("search", "an astronaut", "--limit", "4")
    assert code == 0
    assert "rank" in out and "score" in out and "path" in out and "label" in out
    ranks = [line.split()[0] for line in out.splitlines()[2:] if line.split() and line.split()[0].isdigit()]
    assert ranks == ["1", "2", "3", "4"]


def test_rerun_skips_unchanged_and_reembeds_changed(cli, photos, tmp_path):
    assert cli("ingest", photos)[0] == 0
    code, out, _ = cli("ingest", photos, "--json")
    assert _summary(out)["skipped"] == 6 and _summary(out)["embedded"] == 0

    # same content, new mtime: recognised by its hash, not embedded again
    os.utime(photos / "coffee.jpg", ns=(time.time_ns(), time.time_ns() + 10**9))
    code, out, _ = cli("ingest", photos, "--json")
    assert _summary(out)["embedded"] == 0 and _summary(out)["skipped"] == 6

    # changed content under the same name: embedded again, still one item
    sample_photo("hubble_deep_field").save(photos / "coffee.jpg", quality=90)
    code, out, _ = cli("ingest", photos, "--json")
    assert _summary(out)["embedded"] == 1
    assert _count(cli.db) == (6, 6)
    code, out, _ = cli("search", "--image", photos / "coffee.jpg", "--json", "--limit", "1")
    assert json.loads(out)["path"] == str(photos / "coffee.jpg")


def test_failures_are_recorded_listed_and_retried(cli, photos):
    good = (photos / "coffee.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(good[: len(good) // 4])
    (photos / "empty.png").write_bytes(b"")
    (photos / "text.jpg").write_text("not really a jpeg")
    code, out, err = cli("ingest", photos, "--json")
    assert code == 1
    report = _summary(out)
    assert (report["embedded"], report["failed"]) == (6, 3)

    code, out, _ = cli("failures", "--json")
    rows = {Path(json.loads(line)["source"]).name: json.loads(line) for line in out.splitlines()}
    assert set(rows) == {"truncated.jpg", "empty.png", "text.jpg"}
    assert "truncated" in rows["truncated.jpg"]["reason"]
    assert "empty file" in rows["empty.png"]["reason"]
    assert "not an image" in rows["text.jpg"]["reason"]

    # a plain re-run does not retry them, but still reports that items are failing
    code, out, _ = cli("ingest", photos, "--json")
    assert code == 1 and _summary(out)["previously_failed"] == 3 and _summary(out)["failed"] == 0

    # fix one file; --retry-failed tries all three again
    (photos / "truncated.jpg").write_bytes(good)
    code, out, _ = cli("ingest", photos, "--retry-failed", "--json")
    assert code == 1 and _summary(out)["embedded"] == 1 and _summary(out)["failed"] == 2
    code, out, _ = cli("failures", "--json")
    assert len(out.splitlines()) == 2
    assert all(json.loads(line)["attempts"] == 2 for line in out.splitlines())

    # the human summary names the failures
    code, out, err = cli("ingest", photos)
    assert "2 failed in an earlier run" in out


def test_a_fixed_file_is_retried_without_the_flag(cli, photos):
    (photos / "bad.jpg").write_text("garbage")
    assert cli("ingest", photos)[0] == 1
    sample_photo("rocket").save(photos / "bad.jpg")  # replaced with a real image: new size/mtime
    code, out, _ = cli("ingest", photos, "--json")
    assert code == 0 and _summary(out)["embedded"] == 1
    assert cli("failures", "--json")[1] == ""


def test_limit_embeds_at_most_n_new_items(cli, tmp_path):
    folder = tmp_path / "many"
    noise_images(folder, 12)
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    code, out, _ = cli("ingest", folder, "--limit", "5", "--json", "--batch-size", "2")
    assert _summary(out)["embedded"] == 5
    code, out, _ = cli("ingest", folder, "--limit", "5", "--json")
    assert _summary(out)["embedded"] == 5 and _summary(out)["skipped"] == 5
    code, out, _ = cli("ingest", folder, "--json")
    assert _summary(out)["embedded"] == 2
    assert _count(cli.db) == (12, 12)


def test_image_list_labels_reach_search_results(cli, photos, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(f"# my photos\nphotos/chelsea.jpg,cat,pet\n{photos / 'rocket.jpg'},space\n")
    code, out, _ = cli("ingest", f"image-list:{lst}", "--json")
    assert code == 0 and _summary(out)["embedded"] == 2
    code, out, _ = cli("search", "--image", photos / "chelsea.jpg", "--json", "--limit", "1")
    meta = json.loads(out)["metadata"]
    assert meta["label"] == "cat" and meta["label_2"] == "pet"
    code, out, _ = cli("search", "anything", "--filter", "label=space", "--json")
    assert [json.loads(line)["metadata"]["label"] for line in out.splitlines()] == ["space"]
    # a new label for an unchanged file updates its metadata without embedding it again
    lst.write_text(f"photos/chelsea.jpg,tabby\n{photos / 'rocket.jpg'},space\n")
    code, out, _ = cli("ingest", f"image-list:{lst}", "--json")
    assert (_summary(out)["embedded"], _summary(out)["skipped"]) == (0, 2)
    code, out, _ = cli("search", "tabby", "--mode", "keyword", "--json")
    meta = json.loads(out)["metadata"]
    assert meta["label"] == "tabby" and "label_2" not in meta and meta["width"] == 451


def test_namespaces_are_separate_and_models_never_mix(cli, photos, tiny_hf):
    assert cli("ingest", photos, "--namespace", "a")[0] == 0
    # another model into the same namespace is refused, and nothing is written
    code, _, err = cli("ingest", photos, "--namespace", "a", "--weights", tiny_hf)
    assert code == 2
    assert "namespace 'a' holds vectors of open_clip local:tiny-openclip (32-d)" in err
    assert "hf:tiny-hf-clip" in err and "Traceback" not in err
    # searching it with that other model is refused too
    code, _, err = cli("search", "x", "--namespace", "a", "--weights", tiny_hf)
    assert code == 2 and "holds vectors of" in err
    # a new namespace may use it
    assert cli("ingest", photos, "--namespace", "b", "--weights", tiny_hf)[0] == 0
    code, out, _ = cli("info", "--json")
    info = json.loads(out)
    dims = {ns["namespace"]: (ns["dim"], ns["items"], ns["index"], ns["index_fresh"]) for ns in info["namespaces"]}
    assert dims == {"a": (32, 6, "flat", True), "b": (24, 6, "flat", True)}
    # search defaults to the model recorded for the namespace
    code, out, _ = cli("search", "--image", photos / "astronaut.jpg", "--namespace", "b", "--json", "--limit", "1")
    assert code == 0 and json.loads(out)["path"] == str(photos / "astronaut.jpg")


def test_exit_codes_and_one_line_errors(cli, photos, tmp_path):
    code, _, err = cli("ingest", tmp_path / "missing-folder")
    assert code == 2 and "no such file or folder" in err
    code, _, err = cli("search", "x", "--db", tmp_path / "none.db")
    assert code == 2 and "no database at" in err
    code, _, err = cli("search", "--db", tmp_path / "none.db")
    assert code == 2 and "exactly one" in err
    code, _, err = cli("ingest", photos, "--namespace", "bad/name")
    assert code == 2 and "bad namespace" in err
    code, _, err = cli("ingest", photos, "--device", "cuda") if not _has_cuda() else (2, "", "sees no CUDA GPU")
    assert code == 2 and "sees no CUDA GPU" in err
    assert cli("ingest", photos)[0] == 0
    code, _, err = cli("search", "x", "--namespace", "other")
    assert code == 2 and "namespace 'other' does not exist" in err


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_missing_weights_exit_2_with_one_line(tmp_path, photos):
    """The real console script, as a user runs it: no traceback, one line, exit 2."""
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "empty-cache"), HF_ENDPOINT="http://127.0.0.1:9")
    proc = subprocess.run(
        [sys.executable, "-m", "clipsearch.cli", "ingest", str(photos), "--db", str(tmp_path / "x.db")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: weights for open_clip ViT-B-32 'openai' are not in")
    assert "--weights PATH" in lines[0]


def test_embed_prints_a_json_vector(cli, photos, tiny_openclip, encoder):
    code, out, _ = cli("embed", "--text", "a red dress", "--weights", tiny_openclip)
    vec = np.array(json.loads(out), dtype=np.float32)
    assert code == 0 and vec.shape == (32,)
    np.testing.assert_allclose(vec, encoder.embed_texts(["a red dress"])[0], atol=1e-6)
    # with a database, embed uses the namespace's model
    cli("ingest", photos)
    code, out, _ = cli("embed", "--image", photos / "rocket.jpg")
    assert code == 0 and len(json.loads(out)) == 32
    code, _, err = cli("embed", "--image", photos / "nope.jpg")
    assert code == 1 and "does not exist" in err


def test_duplicates_finds_exact_and_near_copies(cli, tmp_path):
    folder = tmp_path / "dups"
    write_photos(folder, ["astronaut", "coffee", "rocket", "chelsea"])
    (folder / "copy").mkdir()
    (folder / "copy" / "rocket-copy.jpg").write_bytes((folder / "rocket.jpg").read_bytes())
    sample_photo("coffee").resize((400, 266)).save(folder / "coffee-small.png")  # same picture, other bytes
    assert cli("ingest", folder)[0] == 0
    code, out, _ = cli("duplicates", "--json", "--threshold", "0.98")
    groups = [json.loads(line) for line in out.splitlines()]
    by_kind = {g["kind"]: sorted(Path(i["path"]).name for i in g["items"]) for g in groups}
    assert by_kind == {"exact": ["rocket-copy.jpg", "rocket.jpg"], "near": ["coffee-small.png", "coffee.jpg"]}
    exact = next(g for g in groups if g["kind"] == "exact")
    assert exact["score"] == 1.0
    code, out, _ = cli("duplicates")
    assert "group 1 (exact, 2 items" in out


def test_export_shapes_and_order(cli, photos, tmp_path, encoder):
    cli("ingest", photos)
    npy, meta = tmp_path / "v.npy", tmp_path / "m.json"
    code, out, _ = cli("export", "--npy", npy, "--meta", meta)
    assert code == 0
    vectors = np.load(npy)
    data = json.loads(meta.read_text())
    assert vectors.shape == (6, 32) and vectors.dtype == np.float32
    assert data["count"] == 6 and len(data["items"]) == 6
    assert data["model"]["dim"] == 32
    for row, entry in zip(vectors, data["items"], strict=True):
        expected = encoder.embed_images([Image.open(entry["metadata"]["path"]).convert("RGB")])[0]
        assert float(row @ expected) > 0.999  # row i is the vector of item i


def test_info_and_failures_human_output(cli, photos):
    (photos / "bad.gif").write_bytes(b"GIF89a")
    cli("ingest", photos)
    code, out, _ = cli("info")
    assert code == 0 and "local:tiny-openclip" in out and "flat (fresh)" in out
    code, out, _ = cli("failures")
    assert "bad.gif" in out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_interrupted_ingest_resumes_without_loss_or_duplicates(tmp_path, tiny_openclip, sig):
    """Run ingest in a subprocess, kill it (or press Ctrl-C) mid-run, run it again: every image
    is stored exactly once."""
    folder = tmp_path / "many"
    n = 120
    noise_images(folder, n, size=(900, 700))
    db = tmp_path / "kill.db"
    cmd = [
        sys.executable,
        "-m",
        "clipsearch.cli",
        "ingest",
        str(folder),
        "--db",
        str(db),
        "--weights",
        str(tiny_openclip),
        "--batch-size",
        "4",
        "--workers",
        "1",
    ]
    partial = interrupt_mid_run(cmd, db, sig)
    assert 12 <= partial < n, f"the kill should land mid-run (stored {partial} of {n})"

    done = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["skipped"] == partial
    assert report["embedded"] == n - partial
    assert _count(db) == (n, n)


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
