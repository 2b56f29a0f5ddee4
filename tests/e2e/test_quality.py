"""Search quality on a model the suite trains (``tests/trained.py``): pictures of twelve kinds of
coloured shapes, found by their captions. Every face is held to the same answers: the library,
the CLI (whose text queries run on the ONNX towers with clipsearch's own tokenizer and numpy
preprocessing), the HTTP search and the OpenAI-compatible endpoint, and ``eval`` (whose score is
also computed here, independently, from exported vectors).

These tests fail when tokenisation, the text padding cut, pooling, normalisation or
preprocessing is broken (each was broken on purpose once; the README lists what failed)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

import clipsearch
from clipsearch.encoders import ModelSpec, load_encoder
from clipsearch.encoders.towers import find_export
from clipsearch.server import ServerSettings, create_app

from ..conftest import RunningServer
from ..trained import CLASSES, write_dataset

PER_CLASS = 4


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, trained_clip):
    """48 pictures (4 of each class, drawn with another seed than training's), ingested."""
    root = tmp_path_factory.mktemp("quality")
    dataset = write_dataset(root / "shapes", PER_CLASS, seed=123)
    db = root / "q.db"
    with clipsearch.open(db, weights=trained_clip) as col:
        report = col.ingest([dataset])
        assert (report.embedded, report.failed) == (len(CLASSES) * PER_CLASS, 0)
    return {"db": db, "dataset": dataset, "weights": trained_clip}


def label_of(path: str) -> str:
    return Path(path).parent.name.replace("_", " ")


def precision(hits, label: str) -> float:
    return sum(label_of(h.path) == label for h in hits) / len(hits)


def test_text_queries_find_their_class(shapes):
    with clipsearch.open(shapes["db"]) as col:
        scores = {label: precision(col.search(f"a photo of a {label}", limit=PER_CLASS), label) for label in CLASSES}
    assert np.mean(list(scores.values())) >= 0.9, scores
    assert min(scores.values()) >= 0.5, scores


def test_a_cold_cli_query_agrees(shapes):
    """A command's text query in a fresh process runs on the ONNX towers exported by an earlier
    query: clipsearch's own BPE tokenizer, padding cut and pooling, no torch."""
    with clipsearch.open(shapes["db"]) as col:
        col.search("a photo", limit=1)  # exports the towers, if no test did yet
        # the export keeps our tokenizer only if it gives open_clip's ids: else queries stay on torch
        assert find_export(col.spec) is not None, "the torch-free query path is not available"
    right = []
    for label in CLASSES[::2]:
        cmd = [sys.executable, "-m", "clipsearch.cli", "search", f"a photo of a {label}", "--db", str(shapes["db"])]
        run = subprocess.run([*cmd, "--limit", str(PER_CLASS), "--json"], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        paths = [json.loads(line)["path"] for line in run.stdout.splitlines()]
        right.append(sum(label_of(p) == label for p in paths) / PER_CLASS)
    assert np.mean(right) >= 0.9, right


def test_image_queries_find_their_class(shapes):
    with clipsearch.open(shapes["db"]) as col:
        items = [it for items, _ in col.store.iter_vectors("default") for it in items]
        right = [
            precision(col.similar(item.id, limit=PER_CLASS - 1), label_of(item.metadata["path"])) for item in items
        ]
        # a picture searched by its file: itself first, then its class
        photo = next(iter(sorted((shapes["dataset"] / "blue_square").iterdir())))
        hits = col.search(image=photo, limit=PER_CLASS)
    assert np.mean(right) >= 0.85
    assert hits[0].path == str(photo) and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert precision(hits, "blue square") >= 0.75


def test_hybrid_and_arithmetic_keep_the_ranking_meaningful(shapes, tmp_path):
    listing = tmp_path / "labelled.csv"
    listing.write_text("".join(f"{p},{label_of(str(p))}\n" for p in sorted(shapes["dataset"].rglob("*.png"))))
    with clipsearch.open(tmp_path / "h.db", weights=shapes["weights"]) as col:
        col.ingest([f"image-list:{listing}"])
        hybrid = col.search("a photo of a green triangle", mode="hybrid", limit=PER_CLASS)
        assert precision(hybrid, "green triangle") >= 0.75
        # red circle - red + blue: the blue circles
        moved = col.search("a red circle", add=["blue"], subtract=["red"], limit=PER_CLASS)
        assert Counter(label_of(h.path).split()[1] for h in moved)["circle"] >= 3
        assert Counter(label_of(h.path).split()[0] for h in moved)["red"] == 0


def test_eval_zero_shot_scores_well_above_chance_and_matches_the_vectors(shapes, cli, tmp_path):
    code, out, err = cli(
        "eval", "zero-shot", shapes["dataset"], "--template", "a photo of a {}.", "--json",
        "--weights", shapes["weights"], "--db", tmp_path / "e.db",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["n"] == len(CLASSES) * PER_CLASS and report["classes"] == sorted(CLASSES)
    assert report["top1"] >= 0.8 and report["top5"] >= report["top1"]  # chance: 1/12
    assert set(report["per_class"]) == set(CLASSES)

    # the same score from the exported vectors and `clipsearch embed`, computed here
    code, _, err = cli(
        "export", "--npy", tmp_path / "v.npy", "--meta", tmp_path / "v.json", "-n", "eval", "--db", tmp_path / "e.db"
    )
    assert code == 0, err
    vectors = np.load(tmp_path / "v.npy")
    items = json.loads((tmp_path / "v.json").read_text())["items"]
    prompts = []
    for label in sorted(CLASSES):
        code, out, err = cli("embed", "--text", f"a photo of a {label}.", "--db", tmp_path / "e.db", "-n", "eval")
        assert code == 0, err
        prompts.append(json.loads(out))
    predicted = np.argmax(vectors @ np.array(prompts).T, axis=1)
    truth = [sorted(CLASSES).index(label_of(it["metadata"]["path"])) for it in items]
    assert report["top1"] == pytest.approx(float(np.mean(predicted == np.array(truth))))


def test_the_server_and_the_openai_endpoint_agree(shapes):
    spec = ModelSpec(weights=shapes["weights"], device="cpu")
    app = create_app(ServerSettings(db=str(shapes["db"])), lambda: (load_encoder(spec), spec))
    with RunningServer(app) as srv, httpx.Client(base_url=srv.wait_ready().url, timeout=30) as c:
        right = []
        for label in CLASSES:
            body = {"text": f"a photo of a {label}", "limit": PER_CLASS}
            results = c.post("/api/v1/search", json=body).json()["results"]
            right.append(sum(label_of(r["metadata"]["path"]) == label for r in results) / PER_CLASS)
        assert np.mean(right) >= 0.9

        client = OpenAI(base_url=srv.url + "/v1", api_key="unused")
        texts = [f"a photo of a {label}" for label in CLASSES]
        model = client.models.list().data[0].id
        text_vectors = np.array([d.embedding for d in client.embeddings.create(input=texts, model=model).data])
        photos = [sorted((shapes["dataset"] / label.replace(" ", "_")).iterdir())[0] for label in CLASSES]
        inputs = [{"image": "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()} for p in photos]
        images = np.array([d["embedding"] for d in c.post("/v1/embeddings", json={"input": inputs}).json()["data"]])
        # each picture is nearest to its own caption
        assert np.mean(np.argmax(images @ text_vectors.T, axis=1) == np.arange(len(CLASSES))) >= 0.9


def test_eval_compares_configurations_side_by_side(shapes, cli):
    code, out, err = cli(
        "eval", "zero-shot", shapes["dataset"], "--template", "a photo of a {}.", "--weights", shapes["weights"],
        "--compare", "runtime=onnx", "--compare", "runtime=onnx,precision=int8,decode=exact", "--json",
    )  # fmt: skip
    assert code == 0, err
    reports = [json.loads(line) for line in out.splitlines()]
    configs = [(r["config"]["runtime"], r["config"]["precision"], r["config"]["decode"]) for r in reports]
    assert configs == [("torch", "fp32", "fast"), ("onnx", "fp32", "fast"), ("onnx", "int8", "exact")]
    assert all(r["top1"] >= 0.8 and r["embedded"] == r["n"] == len(CLASSES) * PER_CLASS for r in reports)
    code, out, err = cli("eval", "zero-shot", shapes["dataset"], "--weights", shapes["weights"], "--compare", "speed=9")
    assert code == 2 and "bad --compare 'speed=9'" in err


def test_eval_retrieval(shapes, cli, tmp_path):
    """One picture per class, each with its caption, one with a second caption: captions find
    their picture, and pictures their captions."""
    pictures = {label: sorted((shapes["dataset"] / label.replace(" ", "_")).iterdir())[0] for label in CLASSES}
    rows = [(f"r{i}", pictures[label], f"a photo of a {label}") for i, label in enumerate(CLASSES)]
    rows.append(("extra", pictures[CLASSES[0]], f"a drawing of a {CLASSES[0]}"))
    catalog = tmp_path / "captions.csv"
    catalog.write_text("id,image,caption\n" + "".join(f"{i},{p},{c}\n" for i, p, c in rows))
    code, out, err = cli("eval", "retrieval", f"catalog:{catalog}", "--weights", shapes["weights"], "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["images"], report["captions"], report["failed"]) == (len(CLASSES), len(CLASSES) + 1, 0)
    assert report["text_to_image"]["R@1"] >= 0.9 and report["text_to_image"]["R@5"] == 1.0
    assert report["image_to_text"]["R@1"] >= 0.9 and report["image_to_text"]["R@10"] == 1.0


def test_duplicates_are_the_copies_not_the_class(shapes, tmp_path):
    """A re-encoded and a resized copy of a picture are its duplicates; other pictures of the same
    class are not. The threshold sits between the two: the model must tell a copy of a picture
    from another picture of its class (on the model trained here, cosine ~0.999 against 0.92 to
    0.99), and ``duplicates`` must then find exactly the copies."""
    original = sorted((shapes["dataset"] / "red_circle").iterdir())[0]
    folder = tmp_path / "library"
    shutil.copytree(shapes["dataset"], folder)
    Image.open(original).convert("RGB").save(folder / "red_circle" / "copy.jpg", quality=95)
    Image.open(original).resize((192, 144)).save(folder / "red_circle" / "bigger.png")
    with clipsearch.open(tmp_path / "d.db", weights=shapes["weights"]) as col:
        col.ingest([folder])
        vectors = {
            Path(it.metadata["path"]).relative_to(folder).as_posix(): v
            for items, vs in col.store.iter_vectors("default")
            for it, v in zip(items, vs, strict=True)
        }
        copies = ["red_circle/copy.jpg", "red_circle/bigger.png"]
        own = vectors["red_circle/000.png"]
        nearest_copy = min(float(own @ vectors[c]) for c in copies)
        others = [v for name, v in vectors.items() if name not in copies]
        matrix = np.stack(others) @ np.stack(others).T
        nearest_other = float(matrix[np.triu_indices(len(others), 1)].max())
        assert nearest_copy > nearest_other, (nearest_copy, nearest_other)
        groups = col.duplicates((nearest_copy + nearest_other) / 2)
    assert [sorted(Path(it.metadata["path"]).name for it in g.items) for g in groups] == [
        ["000.png", "bigger.png", "copy.jpg"]
    ]
    assert groups[0].kind == "near"
