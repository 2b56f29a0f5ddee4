"""PostgreSQL + pgvector end to end, on a real server (pgserver) started by the tests: the CLI and
the HTTP API on a postgresql:// store, migrations, the HNSW index, two ingest processes sharing
one source, and the worker on an application table (repairs, two workers, SIGTERM, NOTIFY)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import httpx
import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from clipsearch.encoders import ModelSpec, load_encoder
from clipsearch.imaging import decode_image
from clipsearch.server import ServerSettings, create_app
from clipsearch.store import open_store

from ..conftest import RunningServer, noise_images, noise_png


def lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_migrate_an_empty_database_then_nothing_to_do(cli, pg_url):
    code, out, _ = cli("db", "migrate", "--db", pg_url)
    assert code == 0 and "schema (none) -> 4" in out and ":***@" not in out
    code, out, _ = cli("db", "migrate", "--db", pg_url)
    assert code == 0 and "schema 4, up to date" in out
    with psycopg.connect(pg_url) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'clipsearch_%'")}
        assert {"clipsearch_schema", "clipsearch_namespaces", "clipsearch_failures", "clipsearch_claims"} <= tables
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0] >= "0.6"


def test_every_command_works_on_postgres(cli, pg_url, photos, tmp_path):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    code, out, _ = cli("ingest", photos, "--db", pg_url, "--json")
    report = json.loads(out)
    assert code == 1 and (report["embedded"], report["failed"]) == (6, 1)
    code, out, _ = cli("ingest", photos, "--db", pg_url, "--json")
    assert (json.loads(out)["skipped"], json.loads(out)["previously_failed"]) == (6, 1)

    code, out, _ = cli("search", "--image", photos / "coffee.jpg", "--db", pg_url, "--json", "--limit", "3")
    hits = lines(out)
    assert hits[0]["metadata"]["filename"] == "coffee.jpg" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    code, out, _ = cli("search", "rocket", "--mode", "keyword", "--db", pg_url, "--json")
    assert [h["metadata"]["filename"] for h in lines(out)] == ["rocket.jpg"]
    code, out, _ = cli("search", "a rocket", "--mode", "hybrid", "--db", pg_url, "--json")
    assert code == 0 and lines(out)[0]["metadata"]["filename"] == "rocket.jpg"
    code, out, _ = cli("search", "anything", "--filter", "filename=chelsea.jpg", "--db", pg_url, "--json")
    assert [h["metadata"]["filename"] for h in lines(out)] == ["chelsea.jpg"]
    coffee = hits[0]["id"]
    code, out, _ = cli("similar", coffee, "--db", pg_url, "--json")
    assert code == 0 and len(lines(out)) == 5 and coffee not in {h["id"] for h in lines(out)}

    code, out, _ = cli("failures", "--db", pg_url, "--json")
    assert [f["source"].endswith("broken.jpg") for f in lines(out)] == [True]
    code, out, _ = cli("info", "--db", pg_url, "--json")
    (ns,) = json.loads(out)["namespaces"]
    assert (ns["items"], ns["failures"], ns["dim"], ns["index"]) == (6, 1, 32, "none")
    code, out, _ = cli("index", "build", "--db", pg_url)
    assert code == 0 and "default: hnsw index, 6 vectors, fresh" in out
    code, out, _ = cli("search", "--image", photos / "rocket.jpg", "--db", pg_url, "--json", "--limit", "1")
    assert lines(out)[0]["metadata"]["filename"] == "rocket.jpg"  # through the HNSW index now

    code, _, _ = cli("export", "--npy", tmp_path / "v.npy", "--meta", tmp_path / "m.json", "--db", pg_url)
    assert code == 0 and np.load(tmp_path / "v.npy").shape == (6, 32)
    code, _, _ = cli("export", "--format", "seed-compatible", "--out", tmp_path / "seed", "--db", pg_url)
    assert code == 0 and len(json.loads((tmp_path / "seed" / "index_ids.json").read_text())) == 6
    (photos / "coffee-copy.jpg").write_bytes((photos / "coffee.jpg").read_bytes())
    cli("ingest", photos, "--db", pg_url)
    code, out, _ = cli("duplicates", "--db", pg_url, "--json")
    groups = lines(out)
    assert groups[0]["kind"] == "exact" and len(groups[0]["items"]) == 2
    code, _, err = cli("ingest", photos, "--db", pg_url, "--weights", tmp_path / "nope")
    assert code == 2 and "error:" in err


def test_the_http_api_on_postgres(pg_url, tiny_openclip, tmp_path):
    spec = ModelSpec(weights=tiny_openclip, device="cpu")
    store = open_store(pg_url)
    app = create_app(ServerSettings(db=pg_url, media_dir=tmp_path / "media"), lambda: (load_encoder(spec), spec), store)
    with RunningServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        server.wait_ready()
        for i in range(4):
            files = {"file": (f"n{i}.png", noise_png(500 + i), "image/png")}
            data = {"id": f"sku-{i}", "title": f"product {i}", "client": "A" if i < 2 else "B"}
            assert client.post("/api/v1/items", files=files, data=data).status_code == 201
        found = client.post("/api/v1/images/search", files={"file": ("q.png", noise_png(502), "image/png")}).json()
        assert found["results"][0]["id"] == "sku-2" and found["results"][0]["score"] > 0.9999
        keyword = client.post("/api/v1/search", json={"text": "product", "mode": "keyword", "filter": {"client": "B"}})
        assert {r["id"] for r in keyword.json()["results"]} == {"sku-2", "sku-3"}
        same = client.get("/api/v1/items/sku-0/similar", params={"same_filter": "client"}).json()["results"]
        assert [r["id"] for r in same] == ["sku-1"]
        assert client.get("/api/v1/items/sku-0/thumbnail").status_code == 200
        assert client.delete("/api/v1/items/sku-3").status_code == 200
        assert client.get("/health").json()["items"] == 3


def test_two_ingest_processes_share_one_source(tmp_path, tiny_openclip, pg_url):
    folder = tmp_path / "many"
    # enough work that the second process, starting a moment later, still finds some left
    noise_images(folder, 160, size=(640, 480))
    cmd = [sys.executable, "-m", "clipsearch.cli", "ingest", str(folder), "--db", pg_url]
    cmd += ["--weights", str(tiny_openclip), "--batch-size", "4", "--json"]
    # the schema and namespace first, so both processes start on the work itself
    assert subprocess.run([*cmd, "--limit", "0"], capture_output=True, timeout=120).returncode == 0
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    assert sum(r["embedded"] for r in reports) == 160
    assert all(r["embedded"] > 0 for r in reports), reports  # the work was shared
    with psycopg.connect(pg_url) as conn:
        table = conn.execute("SELECT items_table FROM clipsearch_namespaces").fetchone()[0]
        assert conn.execute(f"SELECT count(*), count(DISTINCT id) FROM {table}").fetchone() == (160, 160)
        assert conn.execute("SELECT count(*) FROM clipsearch_claims").fetchone()[0] == 0


# -- the worker on an application table ----------------------------------------------------
TABLE = """
CREATE TABLE product_embeddings (
    asset_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    image_url text,
    description text,
    embedding vector({dim}),
    model_version text,
    embedding_status text,
    error text,
    writes integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz
);
CREATE FUNCTION count_writes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.writes := OLD.writes + 1; RETURN NEW; END $$;
CREATE TRIGGER count_writes BEFORE UPDATE OF embedding ON product_embeddings
    FOR EACH ROW EXECUTE FUNCTION count_writes();
"""


def make_table(url: str, rows: list[dict], dim: int = 32) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        conn.execute(TABLE.format(dim=dim))
        for row in rows:
            cols = ", ".join(row)
            conn.execute(
                f"INSERT INTO product_embeddings ({cols}) VALUES ({', '.join(['%s'] * len(row))})", list(row.values())
            )


def table_rows(url: str) -> dict[str, dict]:
    with psycopg.connect(url) as conn:
        register_vector(conn)
        cur = conn.execute("SELECT * FROM product_embeddings")
        names = [d.name for d in cur.description]
        return {str(r[0]): dict(zip(names, r, strict=True)) for r in cur.fetchall()}


WORKER = ["worker", "--table", "product_embeddings", "--id-column", "asset_id", "--vector-column", "embedding"]
STATUS = ["--status-column", "embedding_status", "--model-column", "model_version"]


def test_worker_fills_repairs_and_records(cli, pg_url, image_server, tiny_openclip, encoder):
    base = image_server.url
    zero, other, done_ok = (str(uuid.uuid4()) for _ in range(3))
    rows = [{"image_url": f"{base}/noise/{600 + i}.png"} for i in range(5)]
    rows += [
        {"image_url": f"{base}/status/404"},
        {
            "asset_id": zero,
            "image_url": f"{base}/noise/610.png",
            "embedding": np.zeros(32, np.float32),
            "embedding_status": "done",
            "model_version": "ViT-B-32/openai",
        },
        {
            "asset_id": other,
            "image_url": f"{base}/noise/611.png",
            "embedding": np.ones(32, np.float32) / 32**0.5,
            "embedding_status": "done",
            "model_version": "old-model",
        },
    ]
    make_table(pg_url, rows)
    version = "tiny-v1"
    args = [*WORKER, "--image-column", "image_url", *STATUS, "--error-column", "error", "--model-version", version]
    code, out, _ = cli(*args, "--db", pg_url, "--weights", tiny_openclip, "--json")
    report = json.loads(out)
    assert code == 1 and (report["embedded"], report["failed"]) == (5, 1)  # not the repairs: not asked
    code, out, _ = cli(
        *args, "--requeue-zero", "--requeue-model-mismatch", "--db", pg_url, "--weights", tiny_openclip, "--json"
    )
    assert (json.loads(out)["embedded"], json.loads(out)["failed"]) == (2, 0)  # the failed row stays failed

    stored = table_rows(pg_url)
    failed = [r for r in stored.values() if r["embedding_status"] == "failed"]
    assert len(failed) == 1 and "HTTP 404" in failed[0]["error"] and failed[0]["embedding"] is None
    for row in stored.values():
        if row["embedding_status"] != "done":
            continue
        assert row["model_version"] == version and row["updated_at"] is not None and row["writes"] == 1
        expected = encoder.embed_crops(
            encoder.preprocess.crop(
                decode_image(
                    noise_png(int(row["image_url"].rsplit("/", 1)[1].split(".")[0])),
                    draft_size=encoder.preprocess_spec.draft_size,
                ).image
            )[None]
        )[0]
        assert float(np.dot(row["embedding"].to_numpy(), expected)) > 0.9999
    # nothing left: a third run takes nothing
    code, out, _ = cli(
        *args, "--requeue-zero", "--requeue-model-mismatch", "--db", pg_url, "--weights", tiny_openclip, "--json"
    )
    assert json.loads(out)["embedded"] == 0
    code, out, _ = cli(*args, "--retry-failed", "--db", pg_url, "--weights", tiny_openclip, "--json")
    assert json.loads(out)["failed"] == 1


def test_worker_embeds_a_text_column(cli, pg_url, tiny_openclip, encoder):
    make_table(pg_url, [{"description": "a red dress"}, {"description": "green boots"}, {"description": ""}])
    code, out, _ = cli(*WORKER, "--text-column", "description", "--db", pg_url, "--weights", tiny_openclip, "--json")
    assert (json.loads(out)["embedded"], json.loads(out)["failed"]) == (2, 1)
    by_text = {r["description"]: r for r in table_rows(pg_url).values()}
    assert np.allclose(
        by_text["a red dress"]["embedding"].to_numpy(), encoder.embed_texts(["a red dress"])[0], atol=1e-5
    )


def test_worker_refuses_a_column_of_another_dimension(cli, pg_url, tiny_openclip):
    make_table(pg_url, [{"image_url": "http://127.0.0.1:9/x.png"}], dim=512)
    code, _, err = cli(*WORKER, "--image-column", "image_url", "--db", pg_url, "--weights", tiny_openclip)
    assert code == 2 and "vector(512)" in err and "32-d" in err
    assert all(r["embedding"] is None and r["updated_at"] is None for r in table_rows(pg_url).values())
    code, _, err = cli(*WORKER, "--image-column", "picture", "--db", pg_url, "--weights", tiny_openclip)
    assert code == 2 and "no column 'picture'" in err


def worker_process(pg_url, tiny_openclip, *extra):
    cmd = [sys.executable, "-m", "clipsearch.cli", *WORKER, "--image-column", "image_url", *STATUS]
    cmd += ["--db", pg_url, "--weights", str(tiny_openclip), "--json", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_workers_share_a_table_and_write_each_row_once(pg_url, image_server, tiny_openclip):
    # each image answered after 0.5 s: one worker alone needs several seconds for the 60, more than
    # the two take to start one after the other, so that both get rows however the machine is loaded
    make_table(pg_url, [{"image_url": f"{image_server.url}/noise/{700 + i}.png?s=0.5"} for i in range(60)])
    procs = [worker_process(pg_url, tiny_openclip, "--batch-size", "4") for _ in range(2)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    assert sum(r["embedded"] for r in reports) == 60 and all(r["embedded"] > 0 for r in reports)
    rows = table_rows(pg_url).values()
    assert all(r["embedding_status"] == "done" and r["writes"] == 1 for r in rows)


def test_sigterm_finishes_the_batch_in_hand(pg_url, image_server, tiny_openclip):
    make_table(pg_url, [{"image_url": f"{image_server.url}/slow?s=1.{i}"} for i in range(8)])
    before = image_server.hits["/slow"]
    proc = worker_process(pg_url, tiny_openclip, "--batch-size", "4", "--watch", "--concurrency", "4")
    deadline = time.time() + 60
    while image_server.hits["/slow"] < before + 4 and time.time() < deadline:
        time.sleep(0.02)  # the first batch is downloading
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["embedded"] == 4  # that batch, and no other
    statuses = sorted(str(r["embedding_status"]) for r in table_rows(pg_url).values())
    assert statuses == ["None"] * 4 + ["done"] * 4


def test_watch_wakes_on_notify_from_the_installed_trigger(cli, pg_url, image_server, tiny_openclip):
    make_table(pg_url, [])
    code, out, _ = cli(
        "worker",
        "install-trigger",
        "--db",
        pg_url,
        "--table",
        "product_embeddings",
        "--image-column",
        "image_url",
        "--status-column",
        "embedding_status",
    )
    assert code == 0 and "clipsearch_product_embeddings" in out
    proc = worker_process(pg_url, tiny_openclip, "--watch", "--poll-interval", "600")
    try:
        time.sleep(1.5)  # listening by now (a late start only means the first poll finds the row)
        with psycopg.connect(pg_url) as conn:
            conn.execute(
                "INSERT INTO product_embeddings (image_url) VALUES (%s)", (f"{image_server.url}/noise/800.png",)
            )
        deadline = time.time() + 60
        while time.time() < deadline:
            if [r["embedding_status"] for r in table_rows(pg_url).values()] == ["done"]:
                break
            time.sleep(0.1)
        (first,) = table_rows(pg_url).values()
        assert first["embedding_status"] == "done", "the worker did not wake up"
        # a new image for the row clears its vector (the trigger) and queues it again
        with psycopg.connect(pg_url) as conn:
            conn.execute("UPDATE product_embeddings SET image_url = %s", (f"{image_server.url}/noise/801.png",))
        deadline = time.time() + 60
        while time.time() < deadline and next(iter(table_rows(pg_url).values()))["writes"] < 2:
            time.sleep(0.1)
        (row,) = table_rows(pg_url).values()
        assert row["embedding_status"] == "done" and row["writes"] == 2
        assert not np.allclose(row["embedding"].to_numpy(), first["embedding"].to_numpy())
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["embedded"] == 2


@pytest.mark.parametrize("marked_by", ["status", "error"])
def test_repairs_leave_failed_rows_alone(cli, pg_url, image_server, tiny_openclip, marked_by):
    """--requeue-zero took rows already marked failed again: each run fetched their dead URLs
    once more, wrote them again and exited 1. A failed row waits for --retry-failed, whether its
    status column or (without one) its error column marks it."""
    base = image_server.url
    dead = [f"{base}/status/404?zero={marked_by}{i}" for i in range(3)]
    rows = [{"image_url": url, "embedding": np.zeros(32, np.float32), "model_version": "m"} for url in dead]
    rows.append({"image_url": f"{base}/noise/620.png", "embedding": np.zeros(32, np.float32), "model_version": "m"})
    make_table(pg_url, rows)
    columns = [*STATUS] if marked_by == "status" else ["--model-column", "model_version"]
    args = [*WORKER, "--image-column", "image_url", *columns, "--error-column", "error", "--requeue-zero"]
    args += ["--db", pg_url, "--weights", tiny_openclip, "--json"]
    hits = image_server.hits["/status/404"]
    code, out, _ = cli(*args)
    assert code == 1 and (json.loads(out)["embedded"], json.loads(out)["failed"]) == (1, 3)
    assert image_server.hits["/status/404"] - hits == 3
    code, out, _ = cli(*args)  # again: the failed rows are left alone
    assert code == 0 and (json.loads(out)["embedded"], json.loads(out)["failed"]) == (0, 0), out
    assert image_server.hits["/status/404"] - hits == 3  # not fetched again
    writes = {r["image_url"]: r["writes"] for r in table_rows(pg_url).values()}
    assert all(writes[url] == 0 for url in dead)  # a failure writes no vector
    code, out, _ = cli(*args, "--retry-failed")
    assert json.loads(out)["failed"] == 3 and image_server.hits["/status/404"] - hits == 6


def test_schema_1_keyword_columns_are_reindexed_for_cjk_and_folders(pg_url):
    """A table written by schema 1 kept each CJK run as one word; migrating to 2 indexes its
    character pairs, so that a word inside a title is found; 3 adds the folders' words."""
    from clipsearch.encoders import ModelIdentity
    from clipsearch.store import NewItem
    from clipsearch.store.postgres import PostgresStore

    store = PostgresStore(pg_url)
    store.bind_namespace("default", ModelIdentity("open_clip", "tiny", "", 4, {}), {})
    item = NewItem("a", {"title": "赤い財布", "path": "/p/red_wallets/1.jpg"}, "h")
    store.write_batch("default", [item], np.ones((1, 4), np.float32) / 2)
    store.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        table = conn.execute("SELECT items_table FROM clipsearch_namespaces").fetchone()[0]
        conn.execute(f"UPDATE \"{table}\" SET keywords = '赤い財布'")  # what schema 1 wrote
        conn.execute("DELETE FROM clipsearch_schema WHERE version > 1")
    store = PostgresStore(pg_url)
    try:
        assert store.schema_version_before == 1 and store.schema_version() == 4
        assert [h.item.id for h in store.keyword_search("default", "財布", 5)] == ["a"]
        assert [h.item.id for h in store.keyword_search("default", "wallets", 5)] == ["a"]
    finally:
        store.close()


def _topic_vectors(n: int, dim: int = 32, topics: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around a few topics (as CLIP's are), and each one's topic."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, dim))
    topic = rng.integers(0, topics, n)
    v = centres[topic] + 0.6 * rng.standard_normal((n, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32), topic


def test_vectors_are_kept_as_halfvec_and_old_vector_tables_keep_working(pg_url):
    """pgvector >= 0.7 stores new namespaces as halfvec (half the bytes); a table made as
    vector(d) before (and a schema-3 database without the metadata index) migrates and works:
    writes, searches, filters and its HNSW index with vector_ip_ops."""
    from clipsearch.encoders import ModelIdentity
    from clipsearch.index import IndexSettings
    from clipsearch.store import NewItem
    from clipsearch.store.postgres import PostgresStore

    vecs, topic = _topic_vectors(300)
    items = [NewItem(f"i{i}", {"topic": int(t)}, f"h{i}") for i, t in enumerate(topic)]
    store = PostgresStore(pg_url)
    if store.pgvector < (0, 7):
        store.close()
        pytest.skip(f"pgvector {store.pgvector} has no halfvec (scripts/pgvector.sh installs 0.8)")
    for ns in ("new", "old"):
        store.bind_namespace(ns, ModelIdentity("open_clip", "tiny", "", 32, {}), {})
    assert store.vector_type("new") == "halfvec"
    table = store.items_table("old")
    store.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'ALTER TABLE "{table}" ALTER COLUMN embedding TYPE vector(32)')
        conn.execute(f'ALTER TABLE "{table}" ALTER COLUMN text_embedding TYPE vector(32)')
        conn.execute(f'DROP INDEX "{table}_metadata"')
        conn.execute("DELETE FROM clipsearch_schema WHERE version > 3")
    store = PostgresStore(pg_url, IndexSettings(exact_filter_rows=10))
    try:
        assert store.schema_version_before == 3 and store.vector_type("old") == "vector"
        for ns in ("new", "old"):
            store.write_batch(ns, items, vecs)
            store.build_index(ns, kind="hnsw")
            assert store.index_status(ns).reason.startswith(f"HNSW on {store.vector_type(ns)}")
            got = store.get_vectors(ns, ["i7"])["i7"]
            assert np.allclose(got, vecs[7], atol=1e-3 if ns == "new" else 1e-7)
            hits = store.search(ns, vecs[:3], k=5, filters={"topic": int(topic[0])})
            truth = np.argsort(-(vecs[topic == topic[0]] @ vecs[0]))[:5]
            assert [h.item.id for h in hits[0]] == [f"i{i}" for i in np.flatnonzero(topic == topic[0])[truth]]
        with psycopg.connect(pg_url) as conn:
            ops = dict(
                conn.execute(
                    "SELECT c.relname, o.opcname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                    "JOIN pg_opclass o ON o.oid = i.indclass[0] WHERE c.relname LIKE '%embedding_hnsw'"
                ).fetchall()
            )
            assert sorted(ops.values()) == ["halfvec_ip_ops", "vector_ip_ops"]
            # schema 4's metadata index, on the old table too, without GIN's pending list
            options = conn.execute("SELECT reloptions FROM pg_class WHERE relname = %s", (f"{table}_metadata",))
            assert options.fetchone()[0] == ["fastupdate=off"]
    finally:
        store.close()


def test_filters_on_an_hnsw_index_return_min_k_hits_on_every_path(pg_url):
    """A filter counts its rows first: few are scored exactly, many walk the HNSW index with an
    iterative scan, and a walk that comes back short is redone exactly. Every path returns
    min(k, matching rows) hits, best first; the exact path the exact top k."""
    from clipsearch.encoders import ModelIdentity
    from clipsearch.index import IndexSettings
    from clipsearch.store import NewItem
    from clipsearch.store.postgres import PostgresStore

    vecs, topic = _topic_vectors(3000, seed=1)
    rng = np.random.default_rng(2)
    client = np.where(rng.random(3000) < 0.05, "small", "big")
    client[:3] = "tiny"
    items = [
        NewItem(f"i{i}", {"topic": int(t), "client": c}, f"h{i}")
        for i, (t, c) in enumerate(zip(topic, client, strict=True))
    ]
    store = PostgresStore(pg_url, IndexSettings(exact_filter_rows=100, ef_search=40))
    if store.pgvector < (0, 8):
        store.close()
        pytest.skip(f"pgvector {store.pgvector} has no iterative scans (scripts/pgvector.sh installs 0.8)")
    try:
        store.bind_namespace("default", ModelIdentity("open_clip", "tiny", "", 32, {}), {})
        store.write_batch("default", items, vecs)
        store.build_index("default", kind="hnsw")
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'ANALYZE "{store.items_table("default")}"')
        queries = vecs[rng.choice(3000, 12, replace=False)] + 0.05

        # the order PostgreSQL computes: stored vectors and the query are both halfvec
        kept, asked = (x.astype(np.float16).astype(np.float32) for x in (vecs, queries))

        def check(filters: dict, allowed: np.ndarray, k: int) -> float:
            """Every query gets min(k, rows) hits, sorted; the share of the true top k found."""
            found = 0
            for q, got in zip(asked, store.search("default", queries, k=k, filters=filters), strict=True):
                rows = np.flatnonzero(allowed)
                want = rows[np.argsort(-(kept[rows] @ q), kind="stable")[:k]]
                scores = [h.score for h in got]
                assert len(got) == min(k, len(rows)) and scores == sorted(scores, reverse=True)
                assert {h.item.metadata["client"] for h in got} <= set(client[allowed])
                found += len({h.item.id for h in got} & {f"i{i}" for i in want})
            return found / (len(queries) * min(k, int(allowed.sum())))

        assert check({"client": "tiny"}, client == "tiny", 10) == 1.0  # 3 rows: exact
        assert store.search_paths == {"exact": 12}
        assert check({"client": "small"}, client == "small", 10) >= 0.9  # ~150 rows: the walk
        assert store.search_paths["index"] == 12
        store.max_scan_tuples = 1  # the walk stops after its first ef_search tuples: short
        assert check({"client": "small"}, client == "small", 30) >= 0.9
        assert store.search_paths["index+exact"] >= 6
        assert check({"client": "big", "topic": 3}, (client == "big") & (topic == 3), 10) >= 0.9
    finally:
        store.close()
