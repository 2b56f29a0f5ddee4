"""The server's guards against hostile and careless clients, on a real server on 127.0.0.1:
cross-site writes and CORS, Host names, private and tunnelled addresses, URL fetch caps and each
request's image budget, small requests never stuck behind big ones, deep JSON, id conflicts,
documentation assets served locally, a port in use, and the wording of errors."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from clipsearch.encoders import ModelSpec, load_encoder
from clipsearch.pipeline import IngestOptions, Ingestor
from clipsearch.server import ServerSettings, create_app
from clipsearch.sources import FolderSource
from clipsearch.store import SQLiteStore

from ..conftest import RunningServer, free_port, sample_photo, write_photos


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_openclip):
    root = tmp_path_factory.mktemp("hardening")
    paths = write_photos(root / "photos")
    spec = ModelSpec(weights=tiny_openclip, device="cpu")
    encoder = load_encoder(spec)
    with SQLiteStore(root / "lib.db") as store:
        Ingestor(store, encoder, spec, "default", IngestOptions()).run([FolderSource(root / "photos")])
    return {"root": root, "db": root / "lib.db", "paths": {p.stem: p for p in paths}, "spec": spec}


@contextlib.contextmanager
def start(library, **overrides):
    """A ready server on the library's database, with ``overrides`` of its settings."""
    spec = library["spec"]
    settings = ServerSettings(db=str(library["db"]), **overrides)
    with RunningServer(create_app(settings, lambda: (load_encoder(spec), spec))) as srv:
        yield srv.wait_ready()


@pytest.fixture(scope="module")
def server(library):
    with start(library, allowed_origins=("https://app.example",)) as srv:
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def jpeg(name: str = "coffee", size: tuple[int, int] | None = None, fmt: str = "JPEG") -> bytes:
    img = sample_photo(name)
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["error"]


# -- 1. Host and Origin ---------------------------------------------------------------------------
def test_a_cross_site_form_post_is_refused(client):
    files = {"file": ("x.jpg", jpeg(), "image/jpeg")}
    evil = client.post("/api/v1/items", files=files, headers={"Origin": "http://evil.example"})
    assert "cross-origin POST from http://evil.example refused" in error_of(evil, 403)["message"]
    assert client.get("/api/v1/items/x").status_code == 404  # nothing was planted
    # the gallery's own page (same origin) and clients without an Origin work
    same = client.post("/embed", files=files, headers={"Origin": str(client.base_url).rstrip("/")})
    assert same.status_code == 200, same.text
    assert client.post("/embed", files=files).status_code == 200


def test_an_allowed_origin_gets_cors_headers(client):
    origin = "https://app.example"
    preflight = client.options(
        "/api/v1/search",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == origin
    post = client.post("/api/v1/search", json={"text": "a cat"}, headers={"Origin": origin})
    assert post.status_code == 200 and post.headers["access-control-allow-origin"] == origin
    other = client.options(
        "/api/v1/search", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in other.headers


def test_a_foreign_host_name_is_refused(client, server):
    """DNS rebinding: a hostile name resolving to 127.0.0.1 reaches the server with its Host."""
    for path in ("/api/v1/namespaces", "/health", "/"):
        error = error_of(client.get(path, headers={"Host": "attacker.example"}), 400)
        assert "does not serve the host name 'attacker.example'" in error["message"]
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}"):
        assert client.get("/health", headers={"Host": host}).status_code == 200


def test_allowed_hosts_from_the_command_line():
    from clipsearch.cli.serve import served_hosts

    assert served_hosts(None, "127.0.0.1", None) == ("localhost", "127.0.0.1", "::1", "127.0.0.1")
    assert served_hosts("photos.lan, nas.local", "0.0.0.0", None) == ("photos.lan", "nas.local")


# -- 2. URL fan-out --------------------------------------------------------------------------------
def test_url_fetches_are_capped(library, image_server):
    """24 slow URLs in one request: fetched at most --max-url-fetches at a time (unbounded
    before: 8 at once here, where the image server's accept queue held the rest)."""
    image_server.most_in_flight = 0
    with (
        start(library, allow_private_urls=True, max_url_fetches=3) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as c,
    ):
        inputs = [{"image": f"{image_server.url}/slow?s=0.2&n={i}"} for i in range(24)]
        response = c.post("/v1/embeddings", json={"input": inputs})
        assert response.status_code == 200, response.text
    assert 1 < image_server.most_in_flight <= 3


def test_the_images_of_one_request_have_a_byte_budget(library, image_server):
    budget = 8 * 1024 * 1024
    with (
        start(library, allow_private_urls=True, max_request_image_bytes=budget) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as c,
    ):
        inputs = [{"image": f"{image_server.url}/big?n={i}"} for i in range(3)]  # 5 MB each
        error = error_of(c.post("/v1/embeddings", json={"input": inputs}), 413)
    assert "total more than 8 MiB" in error["message"] and "--max-request-images-mb" in error["message"]


def test_a_request_over_its_budget_stops_fetching(library, image_server):
    """60 URLs of 5 MB against an 8 MiB budget: the 413 comes at the second image, and the
    fetches waiting for a slot never start (they all ran before: 300 MB for one request)."""
    budget = 8 * 1024 * 1024
    before = image_server.hits["/big"]
    with (
        start(library, allow_private_urls=True, max_request_image_bytes=budget) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as c,
    ):
        inputs = [{"image": f"{image_server.url}/big?n={i}"} for i in range(60)]
        error_of(c.post("/v1/embeddings", json={"input": inputs}), 413)
        time.sleep(0.5)  # anything still running would show up now
    fetched = image_server.hits["/big"] - before
    assert fetched <= 2 + 8, f"{fetched} of 60 fetched"  # at most the per-request slots in flight


# -- 3. abandoned work and fairness ---------------------------------------------------------------
def _send_raw(port: int, path: str, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def test_a_small_request_is_not_stuck_behind_a_big_one_and_abandoned_work_stops(library):
    """One client sends 2048 texts (the model takes one per call here, about 16 s in all); a
    one-text request sent meanwhile is answered in the next batches, not after the 2048; and
    when the big request's client goes away, its remaining texts never reach the model."""
    with start(library, max_text_batch=1, batch_wait_ms=0.0) as srv:
        batcher = srv.app.state.service.text_batcher
        texts = [f"text {i} " + "word " * 60 for i in range(2048)]
        big = _send_raw(srv.port, "/v1/embeddings", json.dumps({"input": texts}).encode())
        deadline = time.monotonic() + 30
        while batcher.items < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            small = c.post("/v1/embeddings", json={"input": "a cat"})
        assert small.status_code == 200
        assert batcher.items < 200  # answered while the big request had most of its texts to go
        big.close()  # the client gives up
        time.sleep(1.0)
        settled = batcher.items
        time.sleep(1.0)
        assert batcher.items - settled <= 2  # nothing more of it is embedded
        assert batcher.items < 1000 and batcher.dropped > 0
        with httpx.Client(base_url=srv.url, timeout=60) as c:  # and the server still answers
            assert c.post("/v1/embeddings", json={"input": "a dog"}).status_code == 200


# -- 4. deeply nested JSON -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path", ["/v1/embeddings", "/api/v1/search", "/api/v1/images/search", "/api/v1/vectors/search"]
)
def test_deeply_nested_json_is_a_400_everywhere(client, path, caplog):
    body = b"[" * 100_000
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert "nested too deeply" in error_of(response, 400)["message"]
    assert "RecursionError" not in caplog.text


# -- 5. the seed's upload field name --------------------------------------------------------------
def test_image_is_accepted_as_well_as_file(client):
    by_file = client.post("/embed", files={"file": ("c.jpg", jpeg(), "image/jpeg")}).json()["embedding"]
    by_image = client.post("/embed", files={"image": ("c.jpg", jpeg(), "image/jpeg")})
    assert by_image.status_code == 200, by_image.text
    assert np.allclose(by_image.json()["embedding"], by_file, atol=1e-6)
    found = client.post("/api/v1/images/search", files={"image": ("c.jpg", jpeg(), "image/jpeg")})
    assert found.status_code == 200 and found.json()["results"][0]["metadata"]["filename"] == "coffee.jpg"
    both = {"file": ("c.jpg", jpeg(), "image/jpeg"), "image": ("d.jpg", jpeg(), "image/jpeg")}
    assert "not both" in error_of(client.post("/embed", files=both), 400)["message"]


# -- 6, 7. uploads: absolute paths, deletes, re-adding an id --------------------------------------
def test_uploads_are_stored_by_absolute_path_and_deleted_with_their_item(library, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = library["spec"]
    app = create_app(ServerSettings(db="qa.db"), lambda: (load_encoder(spec), spec))  # relative, the default
    with RunningServer(app) as srv, httpx.Client(base_url=srv.wait_ready().url, timeout=30) as c:
        item = c.post("/api/v1/items", files={"file": ("a.jpg", jpeg(), "image/jpeg")}, data={"id": "a"}).json()
        path = Path(item["metadata"]["path"])
        assert path.is_absolute() and path.is_file()
        deleted = c.delete("/api/v1/items/a").json()
        assert deleted == {"id": "a", "namespace": "default", "deleted": True, "file_removed": True, "detail": None}
        assert not path.exists()


def test_deleting_an_ingested_item_says_its_file_stays(library, tmp_path):
    photos = write_photos(tmp_path / "photos", ["rocket"])
    spec = library["spec"]
    with SQLiteStore(tmp_path / "x.db") as store:
        Ingestor(store, load_encoder(spec), spec, "default", IngestOptions()).run([FolderSource(tmp_path / "photos")])
        item_id = next(it.id for items, _ in store.iter_vectors("default") for it in items)
    app = create_app(ServerSettings(db=str(tmp_path / "x.db")), lambda: (load_encoder(spec), spec))
    with RunningServer(app) as srv, httpx.Client(base_url=srv.wait_ready().url, timeout=30) as c:
        deleted = c.delete(f"/api/v1/items/{item_id}").json()
    assert deleted["deleted"] is True and deleted["file_removed"] is False
    assert "not an upload of this server" in deleted["detail"] and photos[0].is_file()


def test_re_adding_an_id_is_a_conflict_unless_replace(client, server):
    files = {"file": ("a.jpg", jpeg(), "image/jpeg")}
    first = client.post("/api/v1/items", files=files, data={"id": "dup", "namespace": "re"})
    assert first.status_code == 201
    old_path = Path(first.json()["metadata"]["path"])
    again = client.post("/api/v1/items", files=files, data={"id": "dup", "namespace": "re"})
    assert "already exists" in error_of(again, 409)["message"]
    # replacing it with a PNG: the JPEG original must not stay behind
    png = {"file": ("a.png", jpeg("rocket", fmt="PNG"), "image/png")}
    replaced = client.post("/api/v1/items?replace=true", files=png, data={"id": "dup", "namespace": "re"})
    assert replaced.status_code == 201, replaced.text
    new_path = Path(replaced.json()["metadata"]["path"])
    assert new_path.suffix == ".png" and new_path.is_file() and not old_path.exists()


def test_an_ingested_photo_is_not_replaced_by_accident(client):
    some = client.post("/api/v1/search", json={"text": "x", "limit": 1}).json()["results"][0]
    error = error_of(
        client.post("/api/v1/items", files={"file": ("a.jpg", jpeg(), "image/jpeg")}, data={"id": some["id"]}), 409
    )
    assert some["id"] in error["message"]


# -- 8. ids that look like routes ------------------------------------------------------------------
@pytest.mark.parametrize("item_id", ["x/thumbnail", "y/similar", "a/b/thumbnail"])
def test_every_id_that_can_be_stored_can_be_read(client, item_id):
    files = {"file": ("a.jpg", jpeg(), "image/jpeg")}
    assert client.post("/api/v1/items", files=files, data={"id": item_id, "namespace": "ids"}).status_code == 201
    quoted = item_id.replace("/", "%2F")
    got = client.get(f"/api/v1/items/{quoted}", params={"namespace": "ids"})
    assert got.status_code == 200 and got.json()["id"] == item_id
    thumb = client.get(f"/api/v1/items/{quoted}/thumbnail", params={"namespace": "ids"})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert client.delete(f"/api/v1/items/{quoted}", params={"namespace": "ids"}).json()["deleted"] is True


# -- 9. API docs without internet ------------------------------------------------------------------
def test_docs_load_their_assets_from_the_server(client):
    for page, assets in (("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")), ("/redoc", ("redoc.standalone.js",))):
        html = client.get(page).text
        assert "cdn." not in html and "fonts.googleapis" not in html
        for asset in assets:
            assert f"/docs-assets/{asset}" in html
            served = client.get(f"/docs-assets/{asset}")
            assert served.status_code == 200 and len(served.content) > 10_000


# -- 10. a port in use -----------------------------------------------------------------------------
def test_serve_on_a_port_in_use_is_one_error_line(cli):
    taken = socket.socket()
    taken.bind(("127.0.0.1", free_port()))
    taken.listen(1)
    try:
        code, out, err = cli("serve", "--port", str(taken.getsockname()[1]))
    finally:
        taken.close()
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot listen on 127.0.0.1:") and "in use" in lines[0]
    assert "serving" not in err + out


def test_typed_filters_over_http(client):
    wide = client.post("/api/v1/search", json={"text": "x", "filter": {"width": "512"}, "limit": 50}).json()
    assert wide["results"] and all(r["metadata"]["width"] == 512 for r in wide["results"])
    as_number = client.post("/api/v1/search", json={"text": "x", "filter": {"width": 512}, "limit": 50}).json()
    assert [r["id"] for r in as_number["results"]] == [r["id"] for r in wide["results"]]


# -- 12. OpenAI and load-balancer compatibility, tunnelled addresses -------------------------------
def test_models_retrieve_and_head_health(server):
    from openai import OpenAI

    openai = OpenAI(base_url=server.url + "/v1", api_key="unused")
    listed = openai.models.list().data[0].id
    assert openai.models.retrieve(listed).id == listed
    with pytest.raises(Exception, match="404"):
        openai.models.retrieve("gpt-4o")
    head = httpx.head(server.url + "/health")
    assert head.status_code == 200 and head.content == b""


@pytest.mark.parametrize(
    "address, kind",
    [
        ("2002:7f00:1::", "6to4"),
        ("2002:a00:1::", "6to4"),
        ("64:ff9b::7f00:1", "NAT64"),
        ("64:ff9b:1::a00:1", "NAT64"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo"),
    ],
)
def test_tunnelled_private_addresses_are_refused(client, address, kind):
    response = client.post("/api/v1/images/search", json={"image": f"http://[{address}]/x.jpg"})
    error = error_of(response, 400)
    assert error["code"] == "url_not_allowed" and f"wrapped in a {kind} address" in error["message"]


# -- 13. error wording -----------------------------------------------------------------------------
def test_error_wording(client):
    bad = client.post("/v1/embeddings", content=b'{"input": "x",}', headers={"content-type": "application/json"})
    assert error_of(bad, 400)["message"] == (
        "the request body is not valid JSON at character 14: Expecting property name enclosed in double quotes"
    )
    image_json = client.post(
        "/api/v1/images/search", content=b'{"image": ', headers={"content-type": "application/json"}
    )
    assert "not valid JSON at character 10" in error_of(image_json, 400)["message"]
    files = {"file": ("c.jpg", jpeg(), "image/jpeg")}
    as_form = error_of(client.post("/api/v1/images/search", files=files, data={"limit": "many"}), 422)
    as_json = error_of(client.post("/api/v1/images/search", json={"image": "x", "limit": "many"}), 422)
    assert as_form["message"] == as_json["message"] and as_form["message"].startswith("limit:")
    uri = "data:image/png;base64," + base64.b64encode(b"abc").decode()[:-1] + "*"
    message = error_of(client.post("/api/v1/images/search", json={"image": uri}), 400)["message"]
    assert "data URI's payload is not base64" in message and "http(s) URL" not in message


def test_concurrent_requests_still_get_their_own_vectors(server):
    """The fair batcher returns each request its own rows."""
    texts = [f"text number {i}" for i in range(40)]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        expected = {t: c.post("/v1/embeddings", json={"input": t}).json()["data"][0]["embedding"] for t in texts}
    results: dict[str, list[float]] = {}

    def ask(chunk: list[str]) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            body = c.post("/v1/embeddings", json={"input": chunk}).json()
            for t, row in zip(chunk, body["data"], strict=True):
                results[t] = row["embedding"]

    threads = [threading.Thread(target=ask, args=(texts[i : i + 7],)) for i in range(0, 40, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for t in texts:
        assert np.allclose(results[t], expected[t], atol=1e-5)


# -- filters, ids and types a client gets wrong ------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [{"a": []}, {f"k{i}": 1 for i in range(2000)}, {"width": {"gte": []}}, {"a": [["x"]]}],
)
def test_a_bad_filter_is_a_400_on_every_search_route_and_the_connection_lives_on(client, bad):
    routes = [
        ("/api/v1/search", {"text": "dog", "filter": bad}),
        ("/api/v1/search", {"text": "dog", "filter": bad, "mode": "keyword"}),
        ("/api/v1/vectors/search", {"embedding": [0.1] * 32, "filter": bad}),
    ]
    for path, body in routes:
        answer = client.post(path, json=body)
        assert answer.status_code in (400, 422), answer.text  # the schema's own check, or ours
        error = answer.json()["error"]
        assert error.get("param") == "filter" or "filter" in error["message"], error
    files = {"file": ("x.jpg", jpeg(), "image/jpeg")}
    form = client.post("/api/v1/images/search", files=files, data={"filter": json.dumps(bad)})
    assert form.status_code in (400, 422) and "filter" in form.text, form.text
    assert client.get("/health").status_code == 200  # the same keep-alive connection


def test_an_unexpected_error_is_one_json_500_and_the_connection_stays(library):
    app = create_app(ServerSettings(db=str(library["db"])), lambda: (load_encoder(library["spec"]), library["spec"]))

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    with RunningServer(app) as srv, httpx.Client(base_url=srv.wait_ready().url, timeout=30) as c:
        first = c.get("/boom")
        assert error_of(first, 500)["message"] == "internal error: RuntimeError"
        assert c.get("/health").status_code == 200  # no ECONNRESET on the same connection


@pytest.mark.parametrize("item_id", [".", "..", "a/./b", "a/../b", "../x", "x/.."])
def test_ids_a_url_cannot_reach_are_refused(client, item_id):
    files = {"file": ("x.jpg", jpeg(), "image/jpeg")}
    error = error_of(client.post("/api/v1/items", files=files, data={"id": item_id}), 400)
    assert error["param"] == "id" and "." in error["message"]


def test_two_origin_headers_are_refused(server):
    # httpx would merge them; a raw request sends both, as a confused proxy might
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            b"POST /api/v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://app.example\r\n"
            b"Origin: http://evil.example\r\nContent-Type: application/json\r\nContent-Length: 15\r\n"
            b'Connection: close\r\n\r\n{"text": "dog"}'
        )
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"more than one Origin" in answer


@pytest.mark.parametrize("limit", ["10", True, 2.5])
def test_json_numbers_are_numbers(client, limit):
    """JSON bodies are typed strictly on every route: "10" and true are not a limit. Query
    strings are text by nature, and ?limit=10 is read as the number it spells."""
    error = error_of(client.post("/api/v1/search", json={"text": "dog", "limit": limit}), 422)
    assert "limit" in error["message"]
    assert client.post("/api/v1/search", json={"text": "dog", "limit": 3}).status_code == 200
    assert client.get("/api/v1/items/nothing/similar", params={"limit": "true"}).status_code == 422


def test_a_long_text_costs_its_first_tokens_and_a_huge_one_is_refused(client):
    """A 90,000-character text embeds as its start does (the tower reads 77 tokens); one of 30
    million characters is a 413, not a minute on the model thread."""
    start_of_it = " ".join(f"word{i}" for i in range(200))
    long_text = start_of_it + " " + "x" * 90_000
    vectors = client.post("/v1/embeddings", json={"input": [start_of_it, long_text]}).json()["data"]
    assert np.allclose(vectors[0]["embedding"], vectors[1]["embedding"], atol=1e-6)
    huge = client.post("/v1/embeddings", json={"input": ["a dog", "y" * 30_000_000]})
    error = error_of(huge, 413)
    assert error["message"].startswith("input[1] is 30,000,000 characters")


def test_a_body_without_the_key_is_never_read(library):
    """20 connections without a key, each sending the head of a 31 MiB body: each is answered
    401 from its headers at once, and the server holds none of the bodies."""
    with start(library, api_key="sekrit") as srv:
        socks = []
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            sock.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 32505856\r\n\r\n" + b"[" * 1024
            )
            socks.append(sock)
        for sock in socks:
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 401"), answer[:100]
            sock.close()
        with httpx.Client(base_url=srv.url, timeout=30, headers={"Authorization": "Bearer sekrit"}) as c:
            assert c.post("/v1/embeddings", json={"input": "a dog"}).status_code == 200


def test_a_body_that_stops_arriving_is_dropped(library, monkeypatch):
    from clipsearch.server import app as app_module

    monkeypatch.setattr(app_module, "BODY_IDLE_SECONDS", 0.5)
    with start(library) as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b'POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"in')
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408") and b"stopped arriving" in answer


def test_every_interface_without_a_key_still_checks_the_host(library):
    """--host 0.0.0.0 turned the Host check off, so DNS rebinding read and wrote a keyless
    server. Now it serves loopback and this machine's own names; any name needs --api-key."""
    import socket as sockets

    from clipsearch.cli.serve import served_hosts

    hosts = served_hosts(None, "0.0.0.0", None)
    assert "*" not in hosts and "localhost" in hosts and sockets.gethostname().lower() in hosts
    assert served_hosts(None, "0.0.0.0", "sekrit") == ("*",)
    assert served_hosts("photos.example", "0.0.0.0", None) == ("photos.example",)
    with start(library, allowed_hosts=hosts) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        evil = c.post(
            "/api/v1/search",
            json={"text": "dog"},
            headers={"Host": "attacker.example", "Origin": "http://attacker.example"},
        )
        assert error_of(evil, 400)["code"] == "host_not_allowed"
        assert c.get("/health", headers={"Host": f"{sockets.gethostname()}:{srv.port}"}).status_code == 200


def test_a_text_query_does_not_wait_for_an_image_batch(library):
    """Texts have a thread of their own: while a slow image batch runs (slowed here to 3 s), a
    one-text query is answered at once. With one model thread it waited for the batch."""
    spec = library["spec"]

    def loader():
        encoder = load_encoder(spec)
        embed_crops = encoder.embed_crops

        def slow(crops):
            if len(crops) > 1:  # not the warm-up's single crop
                time.sleep(3.0)
            return embed_crops(crops)

        encoder.embed_crops = slow
        return encoder, spec

    app = create_app(ServerSettings(db=str(library["db"])), loader)
    images = [
        {"image": "data:image/jpeg;base64," + base64.b64encode(jpeg(name)).decode()} for name in ("coffee", "rocket")
    ]
    with RunningServer(app) as srv:
        url = srv.wait_ready().url
        done: dict[str, float] = {}

        def send_images() -> None:
            httpx.post(url + "/v1/embeddings", json={"input": images}, timeout=60).raise_for_status()
            done["images"] = time.monotonic()

        worker = threading.Thread(target=send_images)
        worker.start()
        time.sleep(0.5)  # the image batch is running
        httpx.post(url + "/v1/embeddings", json={"input": "a dog"}, timeout=60).raise_for_status()
        done["text"] = time.monotonic()
        worker.join()
    assert done["text"] < done["images"] - 1.0, done
