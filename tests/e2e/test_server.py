"""The HTTP service, end to end: a real uvicorn server on 127.0.0.1 with a tiny random-init
model, called with httpx and with the official ``openai`` client."""

from __future__ import annotations

import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from clipsearch.encoders import ModelSpec, load_encoder
from clipsearch.imaging import decode_file
from clipsearch.pipeline import IngestOptions, Ingestor
from clipsearch.server import ServerSettings, create_app
from clipsearch.sources import ImageListSource
from clipsearch.store import SQLiteStore

from ..conftest import SAMPLE_PHOTOS, RunningServer, write_photos

LABELS = {
    "astronaut": "person",
    "chelsea": "animal",
    "coffee": "food",
    "rocket": "vehicle",
    "colorwheel": "abstract",
    "immunohistochemistry": "abstract",
}


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_openclip):
    """A database with the six sample photos, labelled, ingested with the tiny model."""
    root = tmp_path_factory.mktemp("server")
    paths = write_photos(root / "photos")
    listing = root / "list.csv"
    listing.write_text("".join(f"{p},{LABELS[p.stem]}\n" for p in paths))
    spec = ModelSpec(weights=tiny_openclip, device="cpu")
    encoder = load_encoder(spec)
    store = SQLiteStore(root / "lib.db")
    Ingestor(store, encoder, spec, "default", IngestOptions()).run([ImageListSource(listing)])
    store.close()
    return {"db": root / "lib.db", "paths": {p.stem: p for p in paths}, "spec": spec, "encoder": encoder}


def make_server(library, tmp_path=None, **overrides) -> RunningServer:
    settings = ServerSettings(**{"db": str(library["db"]), **overrides})
    spec = library["spec"]
    return RunningServer(create_app(settings, lambda: (load_encoder(spec), spec)))


@pytest.fixture(scope="module")
def server(library):
    with make_server(library, batch_wait_ms=2.0) as srv:
        yield srv.wait_ready()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def stored_vector(library, name: str) -> np.ndarray:
    store = SQLiteStore(library["db"])
    try:
        hits = [it for it in store.get_items("default", _all_ids(store)) if it.metadata["filename"] == f"{name}.jpg"]
        return store.get_vectors("default", [hits[0].id])[hits[0].id]
    finally:
        store.close()


def _all_ids(store: SQLiteStore) -> list[str]:
    return [it.id for items, _ in store.iter_vectors("default") for it in items]


def data_uri(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def assert_error(response: httpx.Response, status: int, text: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) >= {"message", "type"}
    assert text in error["message"]
    return error


# -- health, models, docs -------------------------------------------------------------------
def test_health(client, library):
    body = client.get("/health").json()
    assert body["status"] == "healthy"
    assert body["model"] == library["encoder"].model_id
    assert body["device"] == "cpu"
    assert body["dimensions"] == 32
    assert body["items"] == 6


def test_models_and_docs(client, library):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [library["encoder"].model_id]
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/v1/embeddings" in spec["paths"] and "/api/v1/images/search" in spec["paths"]


# -- OpenAI-compatible embeddings -----------------------------------------------------------
def test_openai_client_strings_list_and_base64(server, library):
    from openai import OpenAI

    encoder = library["encoder"]
    oa = OpenAI(base_url=server.url + "/v1", api_key="unused")
    texts = ["a photo of a cat", "a rocket on the launch pad", "coffee"]
    expected = encoder.embed_texts(texts)

    one = oa.embeddings.create(model=encoder.model_id, input=texts[0])
    assert len(one.data) == 1 and one.model == encoder.model_id
    np.testing.assert_allclose(one.data[0].embedding, expected[0], atol=1e-5)

    many = oa.embeddings.create(model=encoder.model_id, input=texts, encoding_format="float")
    assert [d.index for d in many.data] == [0, 1, 2]
    np.testing.assert_allclose([d.embedding for d in many.data], expected, atol=1e-5)
    assert many.usage.prompt_tokens == sum(encoder.count_tokens(texts)) > 0
    assert many.usage.total_tokens == many.usage.prompt_tokens

    # The client asks for base64 unless told otherwise; check the raw base64 format too.
    raw = oa.embeddings.with_raw_response.create(model=encoder.model_id, input=texts, encoding_format="base64")
    payload = raw.http_response.json()
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in payload["data"]]
    np.testing.assert_allclose(decoded, expected, atol=1e-5)


def test_embeddings_of_images_and_texts_in_one_request(client, library):
    encoder = library["encoder"]
    response = client.post(
        "/v1/embeddings",
        json={"input": [{"text": "a cat"}, {"image": data_uri(library["paths"]["chelsea"])}, "coffee"]},
    )
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    np.testing.assert_allclose(data[0]["embedding"], encoder.embed_texts(["a cat"])[0], atol=1e-5)
    np.testing.assert_allclose(data[2]["embedding"], encoder.embed_texts(["coffee"])[0], atol=1e-5)
    # decoded the way ingest decodes, so it lands exactly on the stored vector
    assert float(np.dot(data[1]["embedding"], stored_vector(library, "chelsea"))) > 0.9999
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] == sum(encoder.count_tokens(["a cat", "coffee"])) + encoder.image_tokens


def test_embeddings_bad_requests(client, library):
    encoder = library["encoder"]
    error = assert_error(client.post("/v1/embeddings", json={"input": "x", "dimensions": 512}), 400, "dimensions")
    assert "32" in error["message"]
    assert client.post("/v1/embeddings", json={"input": "x", "dimensions": 32}).status_code == 200
    error = assert_error(client.post("/v1/embeddings", json={"input": "x", "model": "text-embedding-3-small"}), 404)
    assert error["code"] == "model_not_found" and encoder.model_id in error["message"]
    assert_error(client.post("/v1/embeddings", json={"input": []}), 400, "must not be empty")
    assert_error(client.post("/v1/embeddings", json={"input": [[1, 2, 3]]}), 422)
    assert_error(client.post("/v1/embeddings", json={"inputs": "typo"}), 422, "input")
    assert_error(client.post("/v1/embeddings", json={"input": "x", "encoding_format": "int8"}), 422)
    bad = client.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(bad, 400, "not valid JSON at character 1: Expecting property name")
    error = assert_error(
        client.post("/v1/embeddings", json={"input": ["ok", {"image": "bm90IGFuIGltYWdl"}]}), 400, "input[1]"
    )
    assert error["code"] == "invalid_image"
    assert_error(client.post("/v1/embeddings", json={"input": [{"image": "http://127.0.0.1:1/x.jpg"}]}), 400)


def test_ssrf_guard_on_image_urls(client, image_server):
    url = image_server.url + "/img/coffee.jpg"
    before = image_server.hits["/img/coffee.jpg"]
    error = assert_error(client.post("/v1/embeddings", json={"input": [{"image": url}]}), 400, "loopback")
    assert error["code"] == "url_not_allowed" and "--allow-private-urls" in error["message"]
    assert_error(client.post("/api/v1/images/search", json={"image": url}), 400, "loopback")
    assert_error(client.post("/api/v1/images/search", json={"image": "file:///etc/passwd"}), 400, "only http")
    assert image_server.hits["/img/coffee.jpg"] == before  # no request was made


def test_private_urls_when_allowed(library, image_server):
    with (
        make_server(library, allow_private_urls=True, url_timeout=1.0) as srv,
        httpx.Client(base_url=srv.wait_ready().url, timeout=30) as c,
    ):
        response = c.post("/api/v1/images/search", json={"image": image_server.url + "/img/rocket.jpg", "limit": 1})
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["metadata"]["filename"] == "rocket.jpg"
        assert_error(
            c.post("/v1/embeddings", json={"input": [{"image": image_server.url + "/status/404"}]}), 400, "404"
        )
        assert_error(
            c.post("/v1/embeddings", json={"input": [{"image": image_server.url + "/slow"}]}), 400, "timed out"
        )


def test_embed_upload(client, library):
    path = library["paths"]["rocket"]
    response = client.post("/embed", files={"file": ("rocket.jpg", path.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dimensions"] == 32 and len(body["embedding"]) == 32
    assert float(np.dot(body["embedding"], stored_vector(library, "rocket"))) > 0.9999
    assert_error(client.post("/embed", files={"file": ("x.jpg", b"not an image", "image/jpeg")}), 400, "not an image")
    assert_error(client.post("/embed"), 422, "file")


# -- search ---------------------------------------------------------------------------------
def test_text_search(client, library):
    response = client.post("/api/v1/search", json={"text": "a cat", "limit": 4})
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 4
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    query = library["encoder"].embed_texts(["a cat"])[0]
    best = max(SAMPLE_PHOTOS, key=lambda n: float(np.dot(query, stored_vector(library, n))))
    assert results[0]["metadata"]["filename"] == f"{best}.jpg"
    assert set(results[0]) == {"id", "score", "metadata", "thumbnail_url"}

    filtered = client.post("/api/v1/search", json={"text": "a cat", "filter": {"label": "abstract"}}).json()
    assert {r["metadata"]["label"] for r in filtered["results"]} == {"abstract"}
    assert len(filtered["results"]) == 2
    either = client.post("/api/v1/search", json={"text": "x", "filter": {"label": ["food", "animal"]}}).json()
    assert {r["metadata"]["label"] for r in either["results"]} == {"food", "animal"}

    assert_error(client.post("/api/v1/search", json={"text": ""}), 422)
    assert_error(client.post("/api/v1/search", json={"text": "x", "limit": 0}), 422)
    assert_error(client.post("/api/v1/search", json={"text": "x", "namespace": "nope"}), 404, "nope")
    assert_error(client.post("/api/v1/search", json={"text": "x", "namespace": "../etc"}), 400, "bad namespace")


def test_vector_search(client, library):
    vector = stored_vector(library, "coffee")
    body = client.post("/api/v1/vectors/search", json={"embedding": vector.tolist(), "limit": 3}).json()
    assert body["results"][0]["metadata"]["filename"] == "coffee.jpg"
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    error = assert_error(client.post("/api/v1/vectors/search", json={"embedding": [0.1] * 31}), 400, "31 dimensions")
    assert "32" in error["message"]
    assert_error(client.post("/api/v1/vectors/search", json={"embedding": [0.0] * 32}), 400, "all zeros")


def test_image_search_multipart_and_json(client, library):
    path = library["paths"]["astronaut"]
    files = {"file": ("q.jpg", path.read_bytes(), "image/jpeg")}
    body = client.post("/api/v1/images/search", files=files, data={"limit": "2"}).json()
    assert len(body["results"]) == 2
    assert body["results"][0]["metadata"]["filename"] == "astronaut.jpg"
    assert body["results"][0]["score"] > 0.9999
    body = client.post("/api/v1/images/search", json={"image": data_uri(path), "limit": 1}).json()
    assert body["results"][0]["metadata"]["filename"] == "astronaut.jpg"
    assert_error(client.post("/api/v1/images/search", json={"nothing": 1}), 422)
    assert_error(client.post("/api/v1/images/search", files=files, data={"limit": "many"}), 422, "limit")


def test_thumbnails(client, library):
    hit = client.post("/api/v1/search", json={"text": "x", "filter": {"label": "person"}}).json()["results"][0]
    response = client.get(hit["thumbnail_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(response.content))
    assert max(image.size) == 256 and image.format == "JPEG"
    big = client.get(hit["thumbnail_url"] + "&size=512")
    assert max(Image.open(io.BytesIO(big.content)).size) == 512
    assert client.get(hit["thumbnail_url"]).content == response.content  # cached
    assert_error(client.get(hit["thumbnail_url"] + "&size=9999"), 400, "size")


def test_thumbnail_reads_only_items_of_the_store(client):
    for bad in ["..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "../../etc/passwd", "nope"]:
        response = client.get(f"/api/v1/items/{bad}/thumbnail")
        assert response.status_code == 404, bad
        assert response.headers["content-type"].startswith("application/json")


# -- items ----------------------------------------------------------------------------------
def test_item_lifecycle(client, library, tmp_path):
    image = Image.new("RGB", (300, 200), (200, 30, 30))
    for x in range(0, 300, 20):
        image.paste((20, 20, 220), (x, 0, x + 10, 200))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    files = {"file": ("stripes.png", buf.getvalue(), "image/png")}
    data = {"namespace": "uploads", "title": "Stripes", "brand": "Acme", "metadata": '{"tags": ["red", "blue"]}'}
    created = client.post("/api/v1/items", files=files, data=data)
    assert created.status_code == 201, created.text
    item = created.json()
    assert item["namespace"] == "uploads"
    meta = item["metadata"]
    assert meta["title"] == "Stripes" and meta["brand"] == "Acme" and meta["tags"] == ["red", "blue"]
    assert (meta["width"], meta["height"], meta["filename"]) == (300, 200, "stripes.png")
    upload_path = Path(meta["path"])
    assert upload_path.is_file()

    fetched = client.get(f"/api/v1/items/{item['id']}", params={"namespace": "uploads"}).json()
    assert fetched["metadata"] == meta
    thumb = client.get(item["thumbnail_url"])
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size == (256, 171)

    found = client.post(
        "/api/v1/images/search", files={"file": ("q.png", buf.getvalue(), "image/png")}, data={"namespace": "uploads"}
    ).json()
    assert found["results"][0]["id"] == item["id"] and found["results"][0]["score"] > 0.9999
    assert client.get("/api/v1/namespaces").json()["namespaces"][-1]["name"] == "uploads"

    # a second item with a chosen id, then "more like this" excludes the item itself
    second = client.post(
        "/api/v1/items",
        files={"file": ("c.jpg", library["paths"]["coffee"].read_bytes(), "image/jpeg")},
        data={"namespace": "uploads", "id": "sku/42"},
    ).json()
    assert second["id"] == "sku/42"
    similar = client.get("/api/v1/items/sku%2F42/similar", params={"namespace": "uploads"}).json()
    assert [r["id"] for r in similar["results"]] == [item["id"]]

    deleted = client.delete(f"/api/v1/items/{item['id']}", params={"namespace": "uploads"})
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert not upload_path.exists()
    assert_error(client.get(f"/api/v1/items/{item['id']}", params={"namespace": "uploads"}), 404, item["id"])
    assert_error(client.delete(f"/api/v1/items/{item['id']}", params={"namespace": "uploads"}), 404)
    assert client.delete("/api/v1/items/sku%2F42", params={"namespace": "uploads"}).status_code == 200

    assert_error(client.post("/api/v1/items", data={"title": "no file"}), 422, "file")
    assert_error(client.post("/api/v1/items", files={"file": ("x.png", b"junk", "image/png")}), 400, "not an image")
    assert_error(
        client.post("/api/v1/items", files=files, data={"metadata": "[1]", "namespace": "uploads"}), 400, "JSON object"
    )


def test_duplicates(client, library):
    jpeg = library["paths"]["rocket"].read_bytes()
    for _ in range(2):
        client.post("/api/v1/items", files={"file": ("r.jpg", jpeg, "image/jpeg")}, data={"namespace": "dups"})
    body = client.get("/api/v1/duplicates", params={"namespace": "dups", "threshold": 0.99}).json()
    assert len(body["groups"]) == 1
    group = body["groups"][0]
    assert group["kind"] == "exact" and len(group["items"]) == 2
    assert all(it["thumbnail_url"].startswith("/api/v1/items/") for it in group["items"])
    assert client.get("/api/v1/duplicates", params={"threshold": 0.9999}).json()["groups"] == []
    assert_error(client.get("/api/v1/duplicates", params={"threshold": 2}), 422)


# -- errors, limits, concurrency -------------------------------------------------------------
def test_unknown_routes_and_methods_are_json(client):
    assert_error(client.get("/v2/nothing"), 404, "/v2/nothing")
    assert_error(client.get("/v1/embeddings"), 405)


def test_size_limits(library):
    limits = {"max_request_bytes": 200_000, "max_image_bytes": 50_000, "max_megapixels": 0.1}
    with make_server(library, **limits) as srv, httpx.Client(base_url=srv.wait_ready().url, timeout=30) as c:
        huge = "x" * 300_000
        error = assert_error(c.post("/v1/embeddings", json={"input": huge}), 413, "request body")
        assert error["code"] == "too_large"

        def chunks():  # no Content-Length: the limit must hold for streamed bodies too
            for _ in range(30):
                yield b"a" * 10_000

        assert_error(c.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"}), 413)
        big = library["paths"]["astronaut"].read_bytes()  # > 50 kB
        assert_error(c.post("/embed", files={"file": ("a.jpg", big, "image/jpeg")}), 413, "image is larger")
        small = io.BytesIO()
        Image.new("RGB", (800, 600)).save(small, "JPEG")  # 0.48 MP > 0.1 MP
        assert_error(c.post("/embed", files={"file": ("a.jpg", small.getvalue(), "image/jpeg")}), 413, "MP")


def test_concurrent_requests_get_their_own_answers(server, library):
    encoder = library["encoder"]
    texts = [f"query number {i} about {w}" for i, w in enumerate(["cats", "dogs", "rockets", "coffee"] * 8)]
    expected = encoder.embed_texts(texts)
    photos = list(library["paths"].values())

    def call(i: int):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            if i % 4 == 3:
                path = photos[i % len(photos)]
                r = c.post("/v1/embeddings", json={"input": [{"image": data_uri(path)}]})
                return i, path, np.asarray(r.json()["data"][0]["embedding"])
            r = c.post("/v1/embeddings", json={"input": texts[i]})
            return i, None, np.asarray(r.json()["data"][0]["embedding"])

    before = server.app.state.service.text_batcher.items
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(32)))
    for i, path, vector in results:
        if path is None:
            np.testing.assert_allclose(vector, expected[i], atol=1e-5)
        else:
            assert float(np.dot(vector, stored_vector(library, path.stem))) > 0.9999
    assert server.app.state.service.text_batcher.items - before == 24


# -- API key, start-up ----------------------------------------------------------------------
def test_api_key(library):
    from openai import AuthenticationError, OpenAI

    with make_server(library, api_key="s3cret") as srv:
        url = srv.wait_ready().url
        for path, method in [("/v1/embeddings", "post"), ("/api/v1/search", "post"), ("/api/v1/namespaces", "get")]:
            response = getattr(httpx, method)(
                url + path, **({"json": {"input": "x", "text": "x"}} if method == "post" else {})
            )
            error = assert_error(response, 401, "missing API key")
            assert error["type"] == "authentication_error"
            assert response.headers["www-authenticate"] == "Bearer"
        wrong = httpx.post(url + "/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, "invalid API key")
        item_id = _all_ids(SQLiteStore(library["db"]))[0]
        assert httpx.get(f"{url}/api/v1/items/{item_id}/thumbnail").status_code == 401
        ok = httpx.get(f"{url}/api/v1/items/{item_id}/thumbnail", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        # open: health for probes, and the gallery page itself (its API calls carry the key)
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/").status_code == 200

        with pytest.raises(AuthenticationError):
            OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).embeddings.create(
                model=library["encoder"].model_id, input="hi"
            )
        good = OpenAI(base_url=url + "/v1", api_key="s3cret").embeddings.create(
            model=library["encoder"].model_id, input="hi"
        )
        assert len(good.data[0].embedding) == 32


def test_503_while_the_model_loads(library):
    release = threading.Event()
    spec = library["spec"]

    def slow_loader():
        release.wait(30)
        return load_encoder(spec), spec

    app = create_app(ServerSettings(db=str(library["db"])), slow_loader)
    with RunningServer(app) as srv:
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "starting"
        error = assert_error(httpx.post(srv.url + "/v1/embeddings", json={"input": "x"}), 503, "still loading")
        assert error["type"] == "service_unavailable"
        assert_error(httpx.post(srv.url + "/api/v1/search", json={"text": "x"}), 503)
        release.set()
        srv.wait_ready()
        assert httpx.post(srv.url + "/v1/embeddings", json={"input": "x"}).status_code == 200


def test_load_failure_is_reported(library, tmp_path):
    from clipsearch.errors import MissingWeightsError

    def broken():
        raise MissingWeightsError("no weights for ViT-X; pass --weights")

    failures = []
    app = create_app(ServerSettings(db=str(library["db"])), broken)
    app.state.service.on_load_failure = failures.append
    with RunningServer(app) as srv:
        for _ in range(200):
            if failures:
                break
            threading.Event().wait(0.01)
        health = httpx.get(srv.url + "/health").json()
        assert health["status"] == "failed" and "no weights for ViT-X" in health["message"]
        assert_error(httpx.post(srv.url + "/v1/embeddings", json={"input": "x"}), 503, "no weights")
    assert failures == ["no weights for ViT-X; pass --weights"]


def test_with_lock_vectors_the_server_is_healthy_once_its_vectors_are_in_memory(library, tmp_path):
    """CLIPSEARCH_LOCK_VECTORS: the default namespace's index is read and its vectors locked
    before /health says healthy, so that no client's query waits on the disk for them."""
    import sqlite3

    from clipsearch.index import IndexSettings
    from clipsearch.store import NewItem

    db = tmp_path / "locked.db"
    with sqlite3.connect(library["db"]) as source, sqlite3.connect(db) as copy:
        source.backup(copy)
    rng = np.random.default_rng(7)
    extra = rng.normal(size=(400, 32)).astype(np.float32)
    store = SQLiteStore(db)
    store.write_batch(
        "default", [NewItem(f"x{i}", {}) for i in range(400)], extra / np.linalg.norm(extra, axis=1)[:, None]
    )
    store.close()
    locked = SQLiteStore(db, IndexSettings(kind="ivfpq", lock_vectors=True))
    spec = library["spec"]
    app = create_app(ServerSettings(db=str(db)), lambda: (load_encoder(spec), spec), store=locked)
    with RunningServer(app) as srv:
        srv.wait_ready()
        index = locked._indexes[("default", "image")]
        assert index.state.kind == "ivfpq" and index.file.locked and index.file.rows == 406
        query = {"embedding": (extra[3] / np.linalg.norm(extra[3])).tolist(), "limit": 3}
        found = httpx.post(srv.url + "/api/v1/vectors/search", json=query).json()
        assert found["results"][0]["id"] == "x3"


def test_cli_serve_with_missing_weights_exits_with_one_line(cli, tmp_path):
    code, _, stderr = cli("serve", "--weights", str(tmp_path / "missing"), "--port", "0")
    assert code == 2
    assert "error:" in stderr and "does not exist" in stderr and "Traceback" not in stderr


def test_query_image_decoding_matches_ingest(library):
    # /embed, image search and ingest share one decode path (DCT-scaled JPEG); check it directly.
    encoder = library["encoder"]
    path = library["paths"]["coffee"]
    image = decode_file(path, draft_size=encoder.preprocess_spec.draft_size).image
    assert float(np.dot(encoder.embed_images([image])[0], stored_vector(library, "coffee"))) > 0.9999


# -- keyword and hybrid search, similar within a group -------------------------------------------
def test_search_modes_over_http(client):
    keyword = client.post("/api/v1/search", json={"text": "animal", "mode": "keyword"})
    assert keyword.status_code == 200, keyword.text
    results = keyword.json()["results"]
    assert [r["metadata"]["filename"] for r in results] == ["chelsea.jpg"] and results[0]["score"] > 0
    vector = client.post("/api/v1/search", json={"text": "animal", "limit": 6}).json()["results"]
    hybrid = client.post("/api/v1/search", json={"text": "animal", "mode": "hybrid", "limit": 6}).json()["results"]
    fused = {r["id"]: 1 / (60 + rank) for rank, r in enumerate(vector, 1)}
    fused[results[0]["id"]] += 1 / 61
    assert hybrid[0]["id"] == results[0]["id"]  # first in keyword, and in the vector list: first fused
    assert all(abs(r["score"] - round(fused[r["id"]], 6)) < 1e-6 for r in hybrid)
    assert_error(client.post("/api/v1/search", json={"text": "x", "mode": "fuzzy"}), 422, "mode")
    assert_error(client.post("/api/v1/search", json={"text": "!!", "mode": "keyword"}), 400, "no words")


def test_similar_within_the_same_metadata_value(client, library):
    wheel = client.post("/api/v1/search", json={"text": "abstract", "mode": "keyword"}).json()["results"]
    assert len(wheel) == 2
    first, other = wheel[0]["id"], wheel[1]["id"]
    same = client.get(f"/api/v1/items/{first}/similar", params={"same_filter": "label"})
    assert same.status_code == 200 and [r["id"] for r in same.json()["results"]] == [other]
    everything = client.get(f"/api/v1/items/{first}/similar", params={"limit": 10}).json()["results"]
    assert len(everything) == 5 and first not in {r["id"] for r in everything}
    assert_error(client.get(f"/api/v1/items/{first}/similar", params={"same_filter": "client"}), 400, "no client")
    # worded for HTTP: the request field, not the CLI flag
    error = client.get(f"/api/v1/items/{first}/similar", params={"same_filter": "client"}).json()["error"]
    assert (
        error["param"] == "same_filter" and error["message"].endswith("(same_filter)") and "--" not in error["message"]
    )


def test_the_server_and_the_library_refuse_a_mismatch_alike(library, tmp_path):
    """One rule for every face: the server searches through the namespace's Collection, so a
    namespace of another model is refused with the library's own error, word for word, for text
    and image search alike; a raw vector is only checked for length."""
    import clipsearch
    from clipsearch.errors import ModelMismatchError

    from ..conftest import make_tiny_openclip

    other = make_tiny_openclip(tmp_path / "other-model", seed=1)
    db = tmp_path / "other.db"
    photos = write_photos(tmp_path / "photos", ["rocket", "coffee"])
    with clipsearch.open(db, weights=other) as col:
        col.ingest([tmp_path / "photos"])
    with clipsearch.open(db, weights=library["spec"].weights) as col, pytest.raises(ModelMismatchError) as refused:
        col.search("a rocket")
    with make_server(library, db=str(db)) as srv, httpx.Client(base_url=srv.wait_ready().url, timeout=30) as c:
        by_text = assert_error(c.post("/api/v1/search", json={"text": "a rocket"}), 400)
        assert by_text["message"] == refused.value.message and by_text["code"] == "model_mismatch"
        by_image = c.post("/api/v1/images/search", files={"file": photos[0].read_bytes()})
        assert assert_error(by_image, 400)["message"] == refused.value.message
        vector = c.post("/api/v1/vectors/search", json={"embedding": [0.1] * 32})
        assert vector.status_code == 200 and len(vector.json()["results"]) == 2


# -- paging, browsing, what a filter can name, the originals ---------------------------------
def test_search_pages_join_into_the_full_ranking(client):
    full = client.post("/api/v1/search", json={"text": "a cat", "limit": 6}).json()
    assert full["offset"] == 0 and full["next_offset"] == 6  # a full page: there may be more
    pages = [client.post("/api/v1/search", json={"text": "a cat", "limit": 4, "offset": o}).json() for o in (0, 4)]
    assert [p["next_offset"] for p in pages] == [4, None]  # the second page is short: the last
    assert [r["id"] for p in pages for r in p["results"]] == [r["id"] for r in full["results"]]
    first = full["results"][0]
    similar = client.get(first["thumbnail_url"].replace("/thumbnail?", "/similar?") + "&limit=2&offset=2").json()
    nearest = client.get(first["thumbnail_url"].replace("/thumbnail?", "/similar?") + "&limit=5").json()
    assert [r["id"] for r in similar["results"]] == [r["id"] for r in nearest["results"]][2:4]
    assert similar["offset"] == 2 and similar["next_offset"] == 4
    assert_error(client.post("/api/v1/search", json={"text": "x", "limit": 10, "offset": 4995}), 400, "5000")
    assert_error(client.post("/api/v1/search", json={"text": "x", "offset": -1}), 422)
    by_image = client.post(
        "/api/v1/images/search",
        files={"file": ("q.jpg", first_photo_bytes(client, first), "image/jpeg")},
        data={"limit": "2", "offset": "1"},
    ).json()
    assert by_image["offset"] == 1 and len(by_image["results"]) == 2


def first_photo_bytes(client, hit) -> bytes:
    return client.get(hit["thumbnail_url"].replace("/thumbnail?", "/original?")).content


def test_browse_keys_values_and_folders(client, library):
    everything = client.get("/api/v1/items", params={"limit": 4}).json()
    assert everything["total"] == 6 and everything["next_offset"] == 4 and len(everything["items"]) == 4
    rest = client.get("/api/v1/items", params={"limit": 4, "offset": 4}).json()
    assert rest["next_offset"] is None
    ids = [it["id"] for it in everything["items"] + rest["items"]]
    oldest = client.get("/api/v1/items", params={"order": "oldest", "limit": 10}).json()
    assert [it["id"] for it in oldest["items"]] == ids[::-1]
    folder = str(library["paths"]["coffee"].parent)
    inside = client.get("/api/v1/items", params={"folder": folder, "filter": '{"label": "food"}'}).json()
    assert inside["total"] == 1 and inside["items"][0]["metadata"]["filename"] == "coffee.jpg"
    assert client.get("/api/v1/items", params={"folder": folder + "/elsewhere"}).json()["total"] == 0
    assert_error(client.get("/api/v1/items", params={"order": "random"}), 400, "unknown order")
    assert_error(client.get("/api/v1/items", params={"filter": '{"colour": "red"}'}), 400, "no item has")

    keys = {k["key"]: k for k in client.get("/api/v1/namespaces/default/keys").json()["keys"]}
    assert keys["width"]["items"] == 6 and keys["width"]["kinds"] == {"number": 6}
    assert keys["label"]["kinds"] == {"text": 6}
    values = client.get("/api/v1/namespaces/default/keys/label", params={"limit": 2}).json()["values"]
    assert len(values) == 2 and values[0]["items"] >= values[1]["items"]
    folders = client.get("/api/v1/namespaces/default/folders").json()["folders"]
    assert folders == [{"folder": folder, "items": 6}]
    assert_error(client.get("/api/v1/namespaces/nope/keys"), 404, "nope")


def test_filter_mistakes_are_refused_with_what_would_work(client):
    error = assert_error(client.post("/api/v1/search", json={"text": "x", "filter": {"camera_make": "Canon"}}), 400)
    assert error["param"] == "filter" and "'camera_make'" in error["message"] and "label" in error["message"]
    error = assert_error(client.post("/api/v1/search", json={"text": "x", "filter": {"width": {"gte": "abc"}}}), 400)
    assert "width is a number in every item" in error["message"]
    # dates are text: a text bound on a text key is fine
    ok = client.post("/api/v1/search", json={"text": "x", "filter": {"label": {"gte": "a"}}})
    assert ok.status_code == 200


def test_originals_open_and_download(client, library, tmp_path):
    hit = client.post("/api/v1/search", json={"text": "x", "filter": {"label": "food"}}).json()["results"][0]
    url = hit["thumbnail_url"].replace("/thumbnail?", "/original?")
    inline = client.get(url)
    assert inline.status_code == 200 and inline.headers["content-type"] == "image/jpeg"
    assert inline.content == library["paths"]["coffee"].read_bytes()
    assert inline.headers["content-disposition"].startswith("inline")
    saved = client.get(url + "&download=true")
    assert saved.headers["content-disposition"] == 'attachment; filename="coffee.jpg"'
    big = client.get(hit["thumbnail_url"] + "&size=1024")
    assert big.status_code == 200 and Image.open(io.BytesIO(big.content)).size == (600, 400)  # never upscaled
    assert_error(client.get("/api/v1/items/nope/original"), 404)

    item = client.post(
        "/api/v1/items", files={"file": ("c.jpg", inline.content, "image/jpeg")}, data={"namespace": "orig"}
    )
    Path(item.json()["metadata"]["path"]).unlink()
    gone = f"/api/v1/items/{item.json()['id']}/original?namespace=orig"
    assert_error(client.get(gone), 404, "is gone")
