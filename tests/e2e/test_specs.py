"""The specs this project started from, replayed literally: each spec's own commands and
requests, as its users' code sends them, against the real ``clipsearch serve`` and
``clipsearch worker``, so that an operator can put clipsearch in place of those services
without changing a client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
import pytest
from pgvector.psycopg import register_vector

from clipsearch.identity import ModelIdentity

from ..conftest import SAMPLE_PHOTOS, free_port, make_tiny_openclip, noise_png, wait_healthy, write_photos

CLI = [sys.executable, "-m", "clipsearch"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line in this process (as ``main()`` reads its arguments), for speed."""
    from typer.testing import CliRunner

    from clipsearch.cli import _boolean_values, app

    result = CliRunner().invoke(app, _boolean_values(list(args)), env=env, catch_exceptions=False)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


# -- the OpenAI-compatible service spec (Korean), and the Flask spec's /embed -------------------
@pytest.fixture(scope="module")
def vit_l_sized(tmp_path_factory) -> Path:
    """A tiny open_clip with ViT-L-14's 768-d output, as the spec's clients expect."""
    return make_tiny_openclip(tmp_path_factory.mktemp("models") / "tiny-768", embed_dim=768)


def test_openai_service_spec_with_its_model_name(vit_l_sized, tmp_path):
    """The spec's worker sends ``"model": "clip-vit-l/14", "dimensions": 768`` and reads the model
    name back from /health: ``--served-model-name`` (here from its variable, comma-separated)
    makes the server answer to it, and to nothing else."""
    port = free_port()
    env = {**os.environ, "CLIPSEARCH_SERVED_MODEL_NAME": "clip-vit-l/14,openai/clip-vit-large-patch14"}
    args = ["serve", "--db", str(tmp_path / "s.db"), "--port", str(port), "--weights", str(vit_l_sized)]
    server = subprocess.Popen(
        [*CLI, *args], env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "log").open("w"), text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, 90)
        health = httpx.get(f"{base}/health").json()
        assert health["model"] == "clip-vit-l/14" and health["dimensions"] == 768, (tmp_path / "log").read_text()
        # the spec's curl, byte for byte: curl -X POST :3021/v1/embeddings -d '{...}'
        spec_body = '{"input": "2x4 플레이트, 홈 없음, 평평한 표면", "model": "clip-vit-l/14", "dimensions": 768}'
        answer = httpx.post(
            f"{base}/v1/embeddings", content=spec_body.encode(), headers={"content-type": "application/json"}
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == "clip-vit-l/14" and len(body["data"][0]["embedding"]) == 768
        # the second name is accepted too; the models list reports the first
        other = httpx.post(f"{base}/v1/embeddings", json={"input": "a", "model": "openai/clip-vit-large-patch14"})
        assert other.status_code == 200
        assert [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]] == ["clip-vit-l/14"]
        # a name the server was not given is still refused: it is a random-init model, not OpenAI's
        wrong = httpx.post(f"{base}/v1/embeddings", json={"input": "a", "model": "ViT-L/14"})
        assert wrong.status_code == 404 and "--served-model-name" in wrong.json()["error"]["message"]
        # the Flask spec: curl -F "image=@image.png" /embed
        embed = httpx.post(f"{base}/embed", files={"image": ("image.png", noise_png(3), "image/png")})
        assert embed.status_code == 200 and embed.json()["model"] == "clip-vit-l/14"
        assert len(embed.json()["embedding"]) == 768
    finally:
        server.terminate()
        server.wait(30)


def test_public_names_only_where_the_identity_proves_them():
    """Without configuration a server also answers to the names other services use for the
    model it runs, when its identity proves it is that model: OpenAI's weights by open_clip's
    tag or OpenAI's own transformers repository. A file of the same architecture is not."""
    openai = ModelIdentity("open_clip", "ViT-L-14", "openai", 768)
    assert {"clip-vit-l/14", "openai/clip-vit-large-patch14", "ViT-L/14"} <= set(openai.public_names())
    assert ModelIdentity("open_clip", "ViT-L-14", "file:ViT-L-14-random.safetensors", 768).public_names() == ()
    assert ModelIdentity("open_clip", "ViT-L-14", "laion2b_s32b_b82k", 768).public_names() == ()
    hf = ModelIdentity("hf", "openai/clip-vit-base-patch32", "", 512)
    assert "clip-vit-b/32" in hf.public_names()
    assert ModelIdentity("hf", "local:my-clip", "", 512).public_names() == ()
    assert ModelIdentity("onnx", "immich-app/ViT-L-14__openai", "", 768).public_names() == ()


# -- the batch-worker spec: generate-embeddings.ts --limit 10 --client "ClientName" -------------
def test_batch_worker_spec_limit_and_client(pg_url, image_server, tiny_openclip):
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(
            "CREATE TABLE assets (id serial PRIMARY KEY, client text, image_url text, price numeric, "
            "embedding vector(32))"
        )
        for i in range(30):
            client = ["ClientName", "Other", "clientname"][i % 3]
            conn.execute(
                "INSERT INTO assets (client, image_url, price) VALUES (%s, %s, %s)",
                (client, f"{image_server.url}/noise/{900 + i}.png", i),
            )
    worker = ["worker", "--db", pg_url, "--table", "assets", "--id-column", "id", "--vector-column", "embedding"]
    worker += ["--image-column", "image_url", "--weights", str(tiny_openclip), "--json"]

    def filled() -> dict[int, str]:
        with psycopg.connect(pg_url) as conn:
            register_vector(conn)
            return dict(conn.execute("SELECT id, client FROM assets WHERE embedding IS NOT NULL").fetchall())

    # --limit 10: a few rows, to try it
    done = run(*worker, "--limit", "10")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["embedded"] == 10 and len(filled()) == 10
    # --client "ClientName": one client's rows (both together: at most 3 more of them)
    done = run(*worker, "--filter", "client=ClientName", "--limit", "3")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["embedded"] == 3
    done = run(*worker, "--filter", "client=ClientName")
    assert done.returncode == 0, done.stderr
    assert {c for c in filled().values()} >= {"ClientName"}
    with psycopg.connect(pg_url) as conn:
        left = conn.execute("SELECT count(*) FROM assets WHERE embedding IS NULL AND client = 'ClientName'").fetchone()
    assert left[0] == 0
    # any case of A-Z, and a numeric range on the table's own column
    done = run(*worker, "--filter", "client~=CLIENTNAME", "--filter", "price<20")
    assert done.returncode == 0, done.stderr
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT client, price, embedding IS NOT NULL FROM assets").fetchall()
    for client, price, has in rows:
        if client.lower() == "clientname" and price < 20:
            assert has
    # a column the table does not have is one line that lists the columns
    bad = run(*worker, "--filter", "customer=ClientName")
    assert bad.returncode == 2 and "has no such column; its columns: id, client, image_url, price" in bad.stderr


# -- the same-same spec: ingest images:./photos -n vacation --recursive=false --------------------
def test_same_same_spec_commands(tmp_path, tiny_model, monkeypatch):
    photos = tmp_path / "photos"
    write_photos(photos, SAMPLE_PHOTOS[:2])
    write_photos(photos / "nested", SAMPLE_PHOTOS[2:3])
    env = {"CLIPSEARCH_WEIGHTS": str(tiny_model), "CLIPSEARCH_DB": str(tmp_path / "s.db")}
    monkeypatch.chdir(tmp_path)
    done = run("ingest", "images:./photos", "-n", "vacation", "--recursive=false", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["embedded"] == 2  # not the nested one
    again = run("ingest", "images:./photos", "-n", "vacation", "--recursive=true", "--json", env=env)
    assert json.loads(again.stdout)["embedded"] == 1
    listed = tmp_path / "list.txt"
    listed.write_text(f"{photos / 'nested' / (SAMPLE_PHOTOS[2] + '.jpg')}\n")
    done = run("ingest", f"image-list:{listed}", "-n", "vacation", "--json", env=env)
    assert done.returncode == 0 and json.loads(done.stdout)["skipped"] == 1
    hits = run("search", "a photo", "-n", "vacation", "--json", env=env)
    assert hits.returncode == 0 and len(hits.stdout.splitlines()) == 3
