"""The container without a container runtime: ``scripts/container.sh`` (what the Dockerfile runs)
starts the commands of ``compose.yaml``'s services, with compose's environment, against the test
PostgreSQL, in processes that cannot import torch. The model is named as the compose file names
one, OWNER/NAME, and found offline in a seeded Hugging Face cache (installing the script's
venv from the wheel is ``scripts/install_check.sh``'s part)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest
import yaml
from pgvector.psycopg import register_vector

from ..conftest import free_port, hub_with_towers, noise_png

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "container.sh"
REPO = "clipsearch-tests/tiny-towers"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]


@pytest.fixture(scope="module")
def hub(tiny_openclip, tmp_path_factory) -> Path:
    """HF_HOME holding REPO: the tiny model exported to towers."""
    return hub_with_towers(tiny_openclip, REPO, tmp_path_factory.mktemp("container"))


def service_env(compose: dict, name: str, pg_url: str, hub: Path, blocker: Path, tmp: Path) -> dict[str, str]:
    """The service's environment from compose.yaml, with the test's database and model."""
    env = {k: str(v) for k, v in compose[name].get("environment", {}).items()}
    assert env["CLIPSEARCH_DB"].startswith("postgresql://") and "/" in env["CLIPSEARCH_MODEL"]
    env.update(CLIPSEARCH_DB=pg_url, CLIPSEARCH_MODEL=REPO)
    if "CLIPSEARCH_CACHE_DIR" in env:
        env["CLIPSEARCH_CACHE_DIR"] = str(tmp / "downloads")
    return {
        **os.environ,
        **env,
        # the venv the script runs from: here the test's own (the install check uses a clean one)
        "CLIPSEARCH_VENV": sys.prefix,
        "HF_HOME": str(hub),
        "HF_HUB_OFFLINE": "1",
        "CLIPSEARCH_ONNX_CACHE": str(tmp / "onnx"),
        "PYTHONPATH": str(blocker),
        "BLOCK_LOG": str(tmp / "blocked.log"),
    }


def start(env: dict[str, str], command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        ["sh", str(SCRIPT), "start", *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_compose_services_run_from_the_container_script(compose, hub, pg_url, image_server, blocker, tmp_path):
    # the seeded repository is what `models list` shows of the hub cache
    listed = subprocess.run(
        [sys.executable, "-m", "clipsearch", "models", "list", "--json"],
        env=service_env(compose, "serve", pg_url, hub, blocker, tmp_path),
        capture_output=True,
        text=True,
    )
    assert listed.returncode == 0, listed.stderr
    hub_models = [json.loads(line) for line in listed.stdout.splitlines() if '"hub"' in line]
    assert [
        m["folder"].split("/snapshots/")[0].endswith("models--clipsearch-tests--tiny-towers") for m in hub_models
    ] == [True], listed.stdout

    products = (ROOT / "deploy" / "products.sql").read_text()
    assert "vector(512)" in products  # ViT-B-32, the compose file's model; the tiny model is 32-d
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(products.replace("vector(512)", "vector(32)"))

    # the one-shot service: triggers on the table
    env = service_env(compose, "triggers", pg_url, hub, blocker, tmp_path)
    done = subprocess.run(
        ["sh", str(SCRIPT), "start", *compose["triggers"]["command"]], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "triggers installed on products" in done.stdout

    port = free_port()
    serve_env = {**service_env(compose, "serve", pg_url, hub, blocker, tmp_path), "CLIPSEARCH_PORT": str(port)}
    server = start(serve_env, compose["serve"]["command"])
    worker = start(service_env(compose, "worker", pg_url, hub, blocker, tmp_path), compose["worker"]["command"])
    base = f"http://127.0.0.1:{port}"
    try:
        # the image's HEALTHCHECK: failing while the model loads, then passing
        deadline = time.monotonic() + 120
        while subprocess.run(["sh", str(SCRIPT), "health"], env=serve_env, capture_output=True).returncode != 0:
            assert server.poll() is None, server.communicate()[0]
            assert time.monotonic() < deadline, "serve never became healthy"
            time.sleep(0.3)
        health = httpx.get(f"{base}/health").json()
        # our export keeps its checkpoint's identity (interchangeable with the PyTorch model)
        assert health["status"] == "healthy" and health["model"] == "local:tiny-openclip"

        with psycopg.connect(pg_url, autocommit=True) as conn:
            for i in range(3):
                conn.execute(
                    "INSERT INTO products (title, image_url) VALUES (%s, %s)",
                    (f"p{i}", f"{image_server.url}/noise/{900 + i}.png"),
                )
        rows = wait_for_rows(pg_url, 3)
        assert {r[2] for r in rows} == {"done"} and all(r[3] is None for r in rows)
        assert len({r[4] for r in rows}) == 1 and "tiny-openclip" in rows[0][4], rows[0][4]

        # the worker and the server run the same model: the same vector for the same picture
        for title, vector, *_ in rows:
            image = "data:image/png;base64," + base64.b64encode(noise_png(900 + int(title[1:]))).decode()
            body = httpx.post(f"{base}/v1/embeddings", json={"input": [{"image": image}]}).json()
            served = np.asarray(body["data"][0]["embedding"])
            assert float(served @ vector / np.linalg.norm(served) / np.linalg.norm(vector)) > 0.9999
    finally:
        for proc in (worker, server):
            proc.send_signal(signal.SIGTERM)
        outputs = [proc.communicate(timeout=60)[0] for proc in (worker, server)]
    # docker stop sends SIGTERM: both finish what they hold and exit 0
    assert worker.returncode == 0, outputs[0]
    assert server.returncode == 0, outputs[1]
    assert "POST /v1/embeddings" in outputs[1]  # --access-log, as compose starts it
    blocked = tmp_path / "blocked.log"
    assert not blocked.exists(), f"tried to import: {blocked.read_text()}"


def wait_for_rows(pg_url: str, n: int, timeout: float = 60) -> list[tuple]:
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(pg_url) as conn:
            register_vector(conn)
            rows = conn.execute(
                "SELECT title, embedding, embedding_status, embedding_error, model_version FROM products "
                "WHERE embedding IS NOT NULL OR embedding_error IS NOT NULL ORDER BY title"
            ).fetchall()
        if len(rows) >= n:
            return [(title, None if vec is None else vec.to_numpy(), *rest) for title, vec, *rest in rows]
        assert time.monotonic() < deadline, f"the worker filled {len(rows)} of {n} rows"
        time.sleep(0.3)
