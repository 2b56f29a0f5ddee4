"""Ingest on a local Ray cluster (ray.init(num_cpus=2)): the vectors equal the local ingest's,
re-runs skip everything, failures are recorded with the local reasons; SQLite (written by the
driver) and PostgreSQL (written by the workers)."""

from __future__ import annotations

import csv
import json
import uuid

import numpy as np
import pytest

from clipsearch.distributed import ray_log_file
from clipsearch.store import open_store

from ..conftest import noise_images, stored_vectors

ray = pytest.importorskip("ray")


def test_no_cluster_to_join_is_one_line(cli, tmp_path, monkeypatch):
    """First in the module: no cluster has been started in this process yet."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "a.png").write_bytes(b"")
    code, _, err = cli("ingest", tmp_path, "--ray", "auto")
    assert code == 2 and "cannot reach the Ray cluster at 'auto'" in err and "Traceback" not in err


def test_a_no_op_ray_run_starts_no_cluster(cli, tmp_path):
    """Before any cluster fixture: a re-run with nothing to do decides so without Ray."""
    folder = tmp_path / "photos"
    noise_images(folder, 4)
    assert cli("ingest", folder)[0] == 0
    try:
        code, out, _ = cli("ingest", folder, "--ray", "local", "--json")
        assert code == 0 and json.loads(out)["skipped"] == 4
        assert not ray.is_initialized()
    finally:  # a failure here must not leave a cluster to the tests after it
        if ray.is_initialized():
            ray.shutdown()


def test_ray_alone_means_a_local_cluster():
    from clipsearch.cli import _ray_alone_means_local as rewrite

    assert rewrite(["ingest", "photos/", "--ray"]) == ["ingest", "photos/", "--ray=local"]
    assert rewrite(["ingest", "--ray", "photos/"]) == ["ingest", "--ray=local", "photos/"]
    assert rewrite(["ingest", "--ray", "--actors", "2", "x"]) == ["ingest", "--ray=local", "--actors", "2", "x"]
    for address in ("auto", "local", "ray://head:10001", "head.example:10001"):
        assert rewrite(["ingest", "x", "--ray", address]) == ["ingest", "x", "--ray", address]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def library(tmp_path, image_server):
    folder = tmp_path / "photos"
    noise_images(folder, 24, size=(400, 300))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (folder / "empty.png").write_bytes(b"")
    catalog = tmp_path / "products.csv"
    with catalog.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image_url", "title"])
        writer.writerows([f"P{i}", f"{image_server.url}/noise/{1200 + i}.png", f"product {i}"] for i in range(10))
        # a URL of its own: Ray's nodes share the user's download cache, which remembers failed
        # URLs across runs, and this run's reason must be its own fetch's
        writer.writerow(["P404", f"{image_server.url}/status/404?{uuid.uuid4().hex}", "missing"])
    return folder, catalog


def failure_reasons(db) -> dict[str, str]:
    store = open_store(str(db))
    try:
        return {f.id: f.reason for f in store.failures("default")}
    finally:
        store.close()


def test_ray_ingest_matches_local_ingest(cli, ray_cluster, library, tmp_path):
    folder, catalog = library
    sources = [folder, f"catalog:{catalog}", "--text-columns", "title"]
    code, out, _ = cli("ingest", *sources, "--db", tmp_path / "local.db", "--json")
    local = json.loads(out)
    ray_args = ["--db", tmp_path / "ray.db", "--ray", "local", "--batch-size", "8", "--json"]
    code, out, err = cli("ingest", *sources, *ray_args)
    report = json.loads(out)
    # Ray's own log goes to a file, not to the user's terminal
    assert "Execution plan" not in err and "Running Dataset" not in err and "ray.data" not in err
    assert ray_log_file().is_file()
    assert code == 1 and (report["embedded"], report["failed"]) == (local["embedded"], local["failed"]) == (34, 3)

    expected, got = stored_vectors(tmp_path / "local.db"), stored_vectors(tmp_path / "ray.db")
    assert sorted(got) == sorted(expected)
    cosines = [float(np.dot(expected[i], got[i])) for i in expected]
    assert min(cosines) >= 0.9999
    assert failure_reasons(tmp_path / "ray.db") == failure_reasons(tmp_path / "local.db")
    assert "HTTP 404" in failure_reasons(tmp_path / "ray.db")["P404"]
    _, out, _ = cli("search", "product", "--mode", "keyword", "--db", tmp_path / "ray.db", "--json")
    assert len(out.splitlines()) == 10  # catalog text and metadata came along

    code, out, _ = cli("ingest", *sources, "--db", tmp_path / "ray.db", "--ray", "local", "--json")
    again = json.loads(out)
    assert (again["embedded"], again["skipped"], again["previously_failed"]) == (0, 34, 3)


def test_ray_ingest_writes_postgres_from_the_workers(cli, ray_cluster, library, pg_url, tmp_path):
    folder, _ = library
    code, out, _ = cli("ingest", folder, "--db", pg_url, "--ray", "", "--actors", "1", "--json")
    report = json.loads(out)
    assert (report["embedded"], report["failed"]) == (24, 2)
    code, out, _ = cli("ingest", folder, "--db", tmp_path / "local.db", "--json")
    expected, got = stored_vectors(tmp_path / "local.db"), stored_vectors(pg_url)
    # PostgreSQL keeps halfvec (fp16): a vector read back scores ~0.9998 against the fp32 one
    assert sorted(got) == sorted(expected) and min(float(np.dot(expected[i], got[i])) for i in got) >= 0.999
    code, out, _ = cli("ingest", folder, "--db", pg_url, "--ray", "local", "--json")
    assert json.loads(out)["skipped"] == 24
