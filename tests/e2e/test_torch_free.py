"""The torch-free core: tower folders (Immich's layout) exported by ``clipsearch models export``,
moved, and run by processes in which torch, open_clip, transformers, torchvision and FAISS cannot
be imported at all (a meta-path blocker records any attempt); their vectors against open_clip's own.
Also a folder as Immich's exporter writes it (fixed batch of one, int32 text ids, no
``clipsearch.json``), the multilingual (XLM-RoBERTa) family, and the one-line error when a
command needs the torch extra."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import clipsearch
from clipsearch._compat import import_open_clip
from clipsearch.encoders import decoded_as
from clipsearch.encoders.towers import META, TowerEncoder, folder_identity
from clipsearch.tokenizer import clip_tokenizer_json

from ..conftest import SAMPLE_PHOTOS, make_tiny_hf_clip, sample_photo, write_photos
from ..families import make_tiny_multilingual_clip, make_tiny_siglip, make_tiny_siglip2

TEXTS = [
    "a photo of a red circle",
    "a blue square on a pale background, " * 12,  # over 77 tokens
    "빨간 원이 있는 사진",
    "赤い丸の写真",
]


def torch_free(blocker: Path, log: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``clipsearch ARGS`` in a process that cannot import torch & co."""
    env = {**os.environ, "PYTHONPATH": str(blocker), "BLOCK_LOG": str(log), "CLIPSEARCH_ONEDNN": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "clipsearch", *args], env=env, capture_output=True, text=True, timeout=300
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


@pytest.fixture(scope="module")
def exported(tiny_openclip, tmp_path_factory) -> Path:
    """``models export --out``, then the folder moved: the copy is what the tests run."""
    from typer.testing import CliRunner

    from clipsearch.cli import app

    first = tmp_path_factory.mktemp("export") / "tiny"
    result = CliRunner().invoke(app, ["models", "export", "--weights", str(tiny_openclip), "--out", str(first)])
    assert result.exit_code == 0, result.stderr
    moved = tmp_path_factory.mktemp("moved") / "tiny-onnx"
    shutil.move(str(first), moved)
    text = json.dumps(json.loads((moved / "config.json").read_text()))
    assert str(first) not in text and str(tmp_path_factory.getbasetemp()) not in text  # no absolute paths
    return moved


def test_export_equals_open_clip_without_torch(exported, tiny_openclip, tmp_path):
    """Texts (English, over 77 tokens, Korean, Japanese) and images through the moved folder equal
    open_clip's own model on the same checkpoint."""
    open_clip = import_open_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_openclip}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_openclip}")
    images = [sample_photo(n) for n in SAMPLE_PHOTOS]
    with torch.no_grad():
        ref_texts = model.encode_text(tokenizer(TEXTS)).numpy()
        ref_images = model.encode_image(torch.stack([preprocess(i) for i in images])).numpy()
    towers = decoded_as(TowerEncoder(exported), "exact")
    assert cos(towers.embed_texts(TEXTS), ref_texts).min() >= 0.99999
    assert cos(towers.embed_images(images), ref_images).min() >= 0.99999
    # the export is the checkpoint's model: the same identity as the PyTorch model's
    with clipsearch.open(tmp_path / "t.db", weights=tiny_openclip) as col:
        assert col.encoder.identity.same_space(towers.identity)


def test_commands_run_without_torch(exported, blocker, tmp_path):
    log = tmp_path / "blocked.log"
    photos = tmp_path / "photos"
    write_photos(photos)
    db = str(tmp_path / "free.db")
    done = torch_free(blocker, log, "ingest", str(photos), "--db", db, "--weights", str(exported), "--json")
    assert json.loads(done.stdout)["embedded"] == len(list(photos.iterdir()))
    hits = torch_free(blocker, log, "search", "a photo", "--db", db, "--json").stdout.splitlines()
    assert len(hits) == len(list(photos.iterdir()))
    image = sorted(photos.iterdir())[0]
    top = json.loads(
        torch_free(blocker, log, "search", "--image", str(image), "--db", db, "--json").stdout.split("\n")[0]
    )
    assert top["path"] == str(image) and top["score"] > 0.9999
    embedded = json.loads(torch_free(blocker, log, "embed", "--text", "a photo", "--db", db).stdout)
    assert len(embedded) == 32
    torch_free(blocker, log, "duplicates", "--db", db)
    dataset = tmp_path / "classes"
    for label in ("red", "blue"):
        write_photos(dataset / label, SAMPLE_PHOTOS[:2])
    evaluated = torch_free(
        blocker, log, "eval", "zero-shot", str(dataset), "--weights", str(exported), "--json", "--template", "a {}"
    )
    assert json.loads(evaluated.stdout.splitlines()[-1])["n"] == 4
    # the exact index is NumPy's; an approximate one asks for the faiss extra, in one line
    status = json.loads(torch_free(blocker, log, "index", "status", "--db", db, "--json").stdout)
    assert status["kind"] == "flat" and status["fresh"]
    built = torch_free(blocker, log, "index", "build", "--kind", "hnsw", "--db", db, check=False)
    assert built.returncode == 2 and built.stderr.count("\n") == 1, built.stderr
    assert "pip install 'clipsearch[faiss]'" in built.stderr
    assert not log.exists(), f"tried to import: {log.read_text()}"


def test_missing_extra_is_one_line(blocker, tmp_path):
    """Exporting an open_clip checkpoint without the torch extra: one line, exit 2, the extra named
    (brackets printed, not read as markup)."""
    log = tmp_path / "blocked.log"
    photos = tmp_path / "photos"
    write_photos(photos, SAMPLE_PHOTOS[:1])
    done = torch_free(blocker, log, "ingest", str(photos), "--db", str(tmp_path / "x.db"), check=False)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "pip install 'clipsearch[torch]'" in done.stderr and "immich-app/ViT-B-32__openai" in done.stderr
    assert not log.exists()


def immich_folder(tiny_openclip: Path, out: Path) -> Path:
    """A folder as Immich's exporter writes one: TorchScript-era export with a fixed batch of one
    and int32 text ids of the full context, outputs called ``embedding``, a Hugging Face
    tokenizer padded with end-of-text, and no clipsearch.json."""
    open_clip = import_open_clip()
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_openclip}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_openclip}")
    cfg = json.loads((tiny_openclip / "open_clip_config.json").read_text())["model_cfg"]
    (out / "visual").mkdir(parents=True)
    (out / "textual").mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "visual" / "preprocess_cfg.json").write_text(json.dumps(open_clip.get_model_preprocess_cfg(model)))

    class Tower(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.model, self.fn = model, fn

        def forward(self, x):
            return self.fn(x)

    torch.backends.mha.set_fastpath_enabled(False)  # as Immich's exporter: plain attention ops
    with torch.no_grad():
        torch.onnx.export(
            Tower(lambda x: model.encode_image(x, normalize=True)),
            (torch.randn(1, 3, 224, 224),),
            str(out / "visual" / "model.onnx"),
            input_names=["image"],
            output_names=["embedding"],
            dynamo=False,
        )
        torch.onnx.export(
            Tower(lambda t: model.encode_text(t.long(), normalize=True)),
            (torch.ones(1, 77, dtype=torch.int32),),
            str(out / "textual" / "model.onnx"),
            input_names=["text"],
            output_names=["embedding"],
            dynamo=False,
        )
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.__getitem__)
    specials = [tokenizer.decoder[i] for i in tokenizer.all_special_ids]
    # padded with end-of-text, as Hugging Face's CLIP tokenizer pads: argmax pooling finds the first
    clip_tokenizer_json(out / "textual", tokenizer.encoder, merges, specials, specials[1], lower=True)
    return out


def test_a_folder_in_immichs_layout(tiny_openclip, blocker, tmp_path):
    open_clip = import_open_clip()
    folder = immich_folder(tiny_openclip, tmp_path / "ViT-tiny__test")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_openclip}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_openclip}")
    images = [sample_photo(n) for n in SAMPLE_PHOTOS[:3]]
    with torch.no_grad():
        ref_texts = model.encode_text(tokenizer(TEXTS)).numpy()
        ref_images = model.encode_image(torch.stack([preprocess(i) for i in images])).numpy()
    towers = decoded_as(TowerEncoder(folder), "exact")
    assert cos(towers.embed_texts(TEXTS), ref_texts).min() >= 0.99999
    assert cos(towers.embed_images(images), ref_images).min() >= 0.99999  # three runs of one
    # the same files elsewhere, under another name, are the same model; other files are not
    copy = tmp_path / "elsewhere"
    shutil.copytree(folder, copy)
    assert folder_identity(copy, "elsewhere").same_space(folder_identity(folder, folder.name))
    (copy / "visual" / "preprocess_cfg.json").write_text(json.dumps({"size": 224, "mean": [0.5] * 3, "std": [0.5] * 3}))
    assert not folder_identity(copy, "elsewhere").same_space(folder_identity(folder, folder.name))
    # and it runs without torch
    log = tmp_path / "blocked.log"
    photos = tmp_path / "photos"
    write_photos(photos, SAMPLE_PHOTOS[:3])
    db = str(tmp_path / "immich.db")
    torch_free(blocker, log, "ingest", str(photos), "--db", db, "--weights", str(folder))
    assert len(torch_free(blocker, log, "search", "a photo", "--db", db, "--json").stdout.splitlines()) == 3
    assert not log.exists()


def test_multilingual_family_without_torch(tmp_path):
    """An open_clip CLIP with an XLM-RoBERTa text tower: its export's tokenizer.json (the Hugging
    Face tokenizer saved as it saves itself) and towers equal open_clip's own."""
    from clipsearch import models

    open_clip = import_open_clip()
    folder = make_tiny_multilingual_clip(tmp_path / "mclip")
    exported = models.export(clipsearch.ModelSpec(weights=folder), tmp_path / "mclip-onnx", int8=False)
    assert (exported.folder / "textual" / "tokenizer.json").is_file()
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()  # its Hugging Face text tower comes back in training mode (dropout)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        reference = model.encode_text(tokenizer(TEXTS)).numpy()
    towers = TowerEncoder(exported.folder)
    assert cos(towers.embed_texts(TEXTS), reference).min() >= 0.99999
    assert json.loads((exported.folder / META).read_text())["text"]["clean"] == "whitespace"


# Run by a process that cannot import torch: a tower folder's vectors for TEXTS and pictures.
EMBED_WITHOUT_TORCH = """
import sys, numpy as np
from PIL import Image
from clipsearch.encoders import decoded_as
from clipsearch.encoders.towers import TowerEncoder
towers = decoded_as(TowerEncoder(__import__("pathlib").Path(sys.argv[1])), "exact")
texts = [line for line in open(sys.argv[2], encoding="utf-8").read().split("\\n") if line]
images = [Image.open(p) for p in sys.argv[4:]]
np.savez(sys.argv[3], texts=towers.embed_texts(texts), images=towers.embed_images(images))
"""


@pytest.mark.parametrize(
    "make", [make_tiny_hf_clip, make_tiny_siglip, make_tiny_siglip2], ids=["clip", "siglip", "siglip2"]
)
def test_transformers_families_export_and_run_without_torch(make, blocker, cli, tmp_path):
    """A transformers checkpoint (CLIP; SigLIP with its SentencePiece tokenizer, converted; SigLIP
    2 with Gemma's, which pads on the left) exported by ``clipsearch models export``, moved, and
    run by a process that cannot import torch: its vectors equal the transformers model's (through
    clipsearch, whose vectors test_families holds to transformers' own), and so does its identity."""
    folder = make(tmp_path / "model")
    code, out, err = cli("models", "export", f"hf:{folder.name}", "--weights", folder, "--out", tmp_path / "first")
    assert code == 0, err
    moved = tmp_path / "moved" / "towers"
    shutil.move(tmp_path / "first", moved)
    assert (moved / "textual" / "tokenizer.json").is_file()
    texts = [*TEXTS, "&amp; don't <b>STOP</b> 🐶", ""]
    photos = write_photos(tmp_path / "photos", SAMPLE_PHOTOS[:3])
    (tmp_path / "texts.txt").write_text("\n".join(t or " " for t in texts), encoding="utf-8")
    log = tmp_path / "blocked.log"
    env = {**os.environ, "PYTHONPATH": str(blocker), "BLOCK_LOG": str(log)}
    args = [str(moved), str(tmp_path / "texts.txt"), str(tmp_path / "out.npz"), *map(str, photos)]
    done = subprocess.run([sys.executable, "-c", EMBED_WITHOUT_TORCH, *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not log.exists(), f"tried to import: {log.read_text()}"
    got = np.load(tmp_path / "out.npz")
    with clipsearch.open(tmp_path / "r.db", model=f"hf:{folder.name}", weights=folder, decode="exact") as col:
        ref_texts = col.embed_texts([t or " " for t in texts])
        ref_images = col.embed_images(photos)
        identity = col.encoder.identity
    assert cos(got["texts"], ref_texts).min() >= 0.99999
    assert cos(got["images"], ref_images).min() >= 0.99999
    assert folder_identity(moved, "towers").same_space(identity)


def test_serve_without_torch(exported, blocker, tmp_path):
    """``serve`` on the moved export in a process without torch or FAISS: the official openai
    client for texts, an image as a data URI, a search, Prometheus metrics, the access log, and exit 0 on SIGTERM."""
    import base64
    import signal
    import time

    import httpx
    from openai import OpenAI

    from ..conftest import free_port, noise_png, wait_healthy

    log = tmp_path / "blocked.log"
    photos = tmp_path / "photos"
    write_photos(photos, SAMPLE_PHOTOS[:2])
    db = str(tmp_path / "serve.db")
    torch_free(blocker, log, "ingest", str(photos), "--db", db, "--weights", str(exported))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(blocker), "BLOCK_LOG": str(log)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clipsearch",
            "serve",
            "--db",
            db,
            "--port",
            str(port),
            "--access-log",
            "--watch",
            str(photos),
        ],
        env=env,
        stdout=(server_log := (tmp_path / "server.log").open("w")),
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, 60)
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        served = client.models.list().data[0].id
        texts = client.embeddings.create(model=served, input=["a photo of a cat", "赤い丸の写真"])
        assert len(texts.data) == 2 and len(texts.data[0].embedding) == 32
        image = "data:image/png;base64," + base64.b64encode(noise_png(1)).decode()
        body = httpx.post(f"{base}/v1/embeddings", json={"model": served, "input": [{"image": image}]}).json()
        assert len(body["data"][0]["embedding"]) == 32
        metrics = httpx.get(f"{base}/metrics").text
        assert 'clipsearch_embeddings_total{kind="text"} 2.0' in metrics
        assert 'clipsearch_embeddings_total{kind="image"} 1.0' in metrics
        assert 'clipsearch_requests_total{method="POST",route="/v1/embeddings",status="200"} 2.0' in metrics
        assert "clipsearch_queue_depth" in metrics and "clipsearch_batch_size_bucket" in metrics
        found = httpx.post(f"{base}/api/v1/search", json={"text": "a photo", "limit": 5}).json()
        assert len(found["results"]) == 2  # the exact index, NumPy's: FAISS is blocked too
    finally:
        # the --watch pass logs a line once it is done
        deadline = time.monotonic() + 60
        while "synced the folders" not in (tmp_path / "server.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        server_log.close()
        output = (tmp_path / "server.log").read_text()
    assert server.returncode == 0, output
    assert "POST /v1/embeddings" in output  # the access log
    # the start line names the model folder, not the default architecture (newcomer issue, point 9)
    assert f"loading {exported.name} (from {exported})" in output and "ViT-B-32" not in output
    # the library's own log lines at --log-level info: the model ready, a --watch pass
    assert "ready on cpu" in output and "watch: " in output and "synced the folders" in output, output
    assert not log.exists(), f"tried to import: {log.read_text()}"
