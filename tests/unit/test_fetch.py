"""Fetching images by URL, data URI and base64, with the server-side request forgery guard."""

from __future__ import annotations

import asyncio
import base64
import dataclasses

import httpx
import pytest

from clipsearch.errors import FetchError, ForbiddenURLError, ImageError, TooLargeError
from clipsearch.fetch import FetchPolicy, decode_base64_image, fetch_url, load_image_ref

PRIVATE = FetchPolicy(allow_private=True, timeout=2.0, max_bytes=1024 * 1024)
GUARDED = FetchPolicy(allow_private=False, timeout=2.0)


def fetch(url: str, policy: FetchPolicy) -> bytes:
    async def go() -> bytes:
        async with httpx.AsyncClient() as client:
            return await load_image_ref(client, url, policy)

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:9/x.jpg", "loopback"),
        ("http://localhost/x.jpg", "loopback"),
        ("http://[::1]/x.jpg", "loopback"),
        ("http://10.1.2.3/x.jpg", "private"),
        ("http://192.168.0.10/x.jpg", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::ffff:127.0.0.1]/x.jpg", "loopback"),
        ("http://0.0.0.0/x.jpg", "unspecified"),
        ("http://100.64.0.1/x.jpg", "not a public"),
    ],
)
def test_private_addresses_are_refused_by_default(url, why):
    with pytest.raises(ForbiddenURLError) as e:
        fetch(url, GUARDED)
    assert why in e.value.message and "allow_private_urls" in e.value.message


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x.jpg", "gopher://x/"])
def test_only_http_urls(url):
    with pytest.raises(ForbiddenURLError, match="only http and https"):
        fetch(url, GUARDED)


def test_redirect_to_a_private_address_is_refused():
    # The first hop is checked before any request: a loopback URL never gets a connection.
    with pytest.raises(ForbiddenURLError):
        fetch("http://127.0.0.1:1/redirect-to/img/coffee.jpg", GUARDED)


def test_fetch_when_private_urls_are_allowed(image_server):
    data = fetch(image_server.url + "/img/coffee.jpg", PRIVATE)
    assert data == image_server.images["coffee"]
    assert fetch(image_server.url + "/redirect-to/img/rocket.jpg", PRIVATE) == image_server.images["rocket"]


@pytest.mark.parametrize(
    ("path", "error", "text"),
    [
        ("/status/404", FetchError, "HTTP 404"),
        ("/status/500", FetchError, "HTTP 500"),
        ("/html", FetchError, "not an image (content-type text/html)"),
        ("/big", TooLargeError, "over the 1 MiB limit"),
        ("/redirect-loop", FetchError, "redirected more than 3 times"),
        ("/slow", FetchError, "timed out"),
    ],
)
def test_fetch_failures_have_reasons(image_server, path, error, text):
    with pytest.raises(error) as e:
        fetch(image_server.url + path, PRIVATE)
    assert text in e.value.message


def test_size_cap_without_content_length(image_server):
    async def go():
        async with httpx.AsyncClient() as client:
            return await fetch_url(client, image_server.url + "/img/astronaut.jpg", FetchPolicy(True, 2.0, 1000))

    with pytest.raises(TooLargeError):
        asyncio.run(go())


def test_data_uri_and_base64():
    raw = b"\x89PNG\r\n\x1a\nabc"
    b64 = base64.b64encode(raw).decode()
    assert decode_base64_image(f"data:image/png;base64,{b64}", 1000) == raw
    assert decode_base64_image(b64, 1000) == raw
    assert decode_base64_image(base64.urlsafe_b64encode(raw).decode().rstrip("="), 1000) == raw
    with pytest.raises(ImageError, match="base64"):
        decode_base64_image("data:image/png,rawtext", 1000)
    with pytest.raises(ImageError, match="URL, a data: URI or base64"):
        decode_base64_image("not base64 at all!", 1000)
    with pytest.raises(TooLargeError):
        decode_base64_image(base64.b64encode(b"x" * 5000).decode(), 1000)


@pytest.mark.parametrize(("layers", "says"), [(1, "larger than"), (2, "Content-Encoding gzip, gzip")])
def test_a_compressed_body_is_bounded_while_it_inflates(image_server, layers, says):
    """A few KB of gzip (in gzip) that inflate to 256 MiB of zeros: refused without ever holding
    more than the cap and a step. httpx's own decoding inflated each chunk whole first."""
    import tracemalloc

    url = f"{image_server.url}/gzip-bomb/{layers}/256"
    # the test server compresses its bomb on the first request (a second or more beside a busy
    # suite, where it outlasted the 2 s timeout): not what is measured here
    with pytest.raises(ImageError, match=says):
        fetch(url, dataclasses.replace(PRIVATE, timeout=120.0))
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match=says):
            fetch(url, PRIVATE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB"


def test_a_gzip_encoded_image_still_arrives(image_server):
    assert fetch(f"{image_server.url}/gzipped/coffee.jpg", PRIVATE) == image_server.images["coffee"]
