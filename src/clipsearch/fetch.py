"""Fetching image bytes from outside: http(s) URLs, data URIs and bare base64.

The guard against server-side request forgery lives here. A URL that arrives over the API is
resolved first, and every address it resolves to must be public: loopback, private, link-local,
shared, multicast and reserved ranges are refused unless ``allow_private`` is set. The request
then goes to the address that was checked (the Host header and TLS server name keep the
original host), so a DNS answer that changes between check and connect (DNS rebinding) cannot
redirect it. Redirects are followed by hand, each hop checked the same way.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from .errors import FetchError, ForbiddenURLError, ImageError, TooLargeError, option

_DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)
_BASE64_CHARS = re.compile(r"^[A-Za-z0-9+/=_\-\s]+$")


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False
    timeout: float = 10.0  # seconds for the whole fetch, redirects included
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 3
    user_agent: str = "clipsearch"


def decode_base64_image(data: str, max_bytes: int) -> bytes:
    """Bytes of a ``data:`` URI or of bare (standard or URL-safe) base64."""
    match = _DATA_URI.match(data)
    if match:
        if not match.group("b64"):
            raise ImageError("data URI must be base64-encoded (data:image/jpeg;base64,...)")
        payload = data[match.end() :]
    else:
        payload = data
    if len(payload) * 3 // 4 > max_bytes:
        raise TooLargeError(f"image is larger than the {_mib(max_bytes)} limit")
    compact = "".join(payload.split())
    if not compact and match:
        raise ImageError("the data URI holds no data after its comma")
    if not compact or not _BASE64_CHARS.match(compact):
        if match:
            bad = next((c for c in compact if not _BASE64_CHARS.match(c)), "")
            raise ImageError(f"the data URI's payload is not base64 (it contains {bad!r})")
        raise ImageError("image must be an http(s) URL, a data: URI or base64-encoded bytes")
    try:
        if "-" in compact or "_" in compact:
            raw = base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        else:
            raw = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        where = "the data URI's payload" if match else "image"
        raise ImageError(f"{where} is not valid base64") from None
    if not raw:
        raise ImageError("image data is empty")
    return raw


def is_url(ref: str) -> bool:
    return ref[:8].lower().startswith(("http://", "https://"))


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:g} MiB"


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 address carries and how: IPv4-mapped, 6to4 (2002::/16), Teredo
    (2001::/32, its client) or NAT64 (64:ff9b::/96 and the local-use 64:ff9b:1::/48, the last 32
    bits). Each reaches that IPv4 host through a translator or tunnel, so it is judged as it."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    if ip.teredo is not None:
        return ip.teredo[1], "Teredo"
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    return None


def _blocked_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            inner = _blocked_reason(embedded[0])
            return f"{inner} wrapped in a {embedded[1]} address" if inner else None
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_private:
        return "a private address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_reserved or not ip.is_global:
        return "not a public address"
    return None


async def _resolve(host: str, port: int) -> list[str]:
    try:
        ip = ipaddress.ip_address(host)
        return [str(ip)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FetchError(f"cannot resolve host {host!r} ({e.strerror})") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


async def _checked_target(url: str, policy: FetchPolicy) -> tuple[str, str, str]:
    """(url to request, Host header, TLS server name) for ``url``, or ForbiddenURLError."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ForbiddenURLError(f"refusing to fetch {url[:200]!r}: only http and https URLs are allowed")
    host = parts.hostname
    if not host:
        raise ForbiddenURLError(f"refusing to fetch {url[:200]!r}: the URL has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise ForbiddenURLError(f"refusing to fetch {url[:200]!r}: bad port") from None
    addresses = await _resolve(host, port)
    if policy.allow_private:
        return url, parts.netloc.rsplit("@", 1)[-1], host
    for addr in addresses:
        reason = _blocked_reason(ipaddress.ip_address(addr.split("%", 1)[0]))
        if reason:
            raise ForbiddenURLError(
                f"refusing to fetch {url[:200]}: {host} resolves to {addr}, {reason} "
                f"(start the server with {option('allow_private_urls')} to allow such URLs)"
            )
    pinned = addresses[0]
    netloc = f"[{pinned}]" if ":" in pinned else pinned
    if parts.port:
        netloc += f":{parts.port}"
    host_header = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, "")), host_header, host


async def fetch_url(
    client: httpx.AsyncClient, url: str, policy: FetchPolicy, count: Callable[[int], None] | None = None
) -> bytes:
    """GET ``url`` under ``policy``: checked addresses, a size cap, a total timeout. ``count(n)``
    hears of every n bytes of body as they arrive (and may raise to stop the fetch): a budget
    shared by several fetches is kept while they run, not after."""
    try:
        return await asyncio.wait_for(_fetch(client, url, policy, count), timeout=policy.timeout)
    except TimeoutError:
        raise FetchError(f"{url[:200]}: timed out after {policy.timeout:.3g} s", retryable=True) from None


async def _fetch(
    client: httpx.AsyncClient, url: str, policy: FetchPolicy, count: Callable[[int], None] | None
) -> bytes:
    current = url
    for _ in range(policy.max_redirects + 1):
        target, host_header, server_name = await _checked_target(current, policy)
        request = client.build_request(
            "GET",
            target,
            # images are compressed already: a server has no reason to encode them again, and a
            # body it does encode is decoded here under the size cap (see _read_body)
            headers={
                "Host": host_header,
                "User-Agent": policy.user_agent,
                "Accept": "image/*",
                "Accept-Encoding": "identity",
            },
            extensions={"sni_hostname": server_name},
        )
        try:
            response = await client.send(request, stream=True, follow_redirects=False)
        except httpx.TimeoutException:
            raise FetchError(f"{current[:200]}: timed out", retryable=True) from None
        except httpx.HTTPError as e:
            message = f"{current[:200]}: {_what_happened(e)}"
            raise FetchError(message, retryable=isinstance(e, httpx.TransportError)) from None
        try:
            if response.is_redirect:
                location = response.headers.get("location")
                if not location:
                    raise FetchError(f"{current[:200]} redirected without a Location")
                current = urljoin(current, location)
                continue
            if response.status_code != 200:
                code = response.status_code
                raise FetchError(f"{current[:200]} answered HTTP {code}", retryable=code >= 500 or code == 429)
            ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype.startswith("text/") or ctype in ("application/json", "application/xml"):
                raise FetchError(f"{current[:200]} is not an image (content-type {ctype})")
            length = response.headers.get("content-length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise TooLargeError(f"{current[:200]} is {int(length)} bytes, over the {_mib(policy.max_bytes)} limit")
            return await _read_body(response, current, policy.max_bytes, count)
        except httpx.TimeoutException:
            raise FetchError(f"{current[:200]}: timed out while reading the body", retryable=True) from None
        except httpx.HTTPError as e:
            raise FetchError(f"{current[:200]}: {_what_happened(e)}", retryable=True) from None
        finally:
            await response.aclose()
    raise FetchError(f"{url[:200]} redirected more than {policy.max_redirects} times")


def _what_happened(e: httpx.HTTPError) -> str:
    """An httpx error in words a person running a catalog can act on."""
    if isinstance(e, httpx.RemoteProtocolError):
        return "the server closed the connection before the whole response arrived"
    if isinstance(e, httpx.ConnectError):
        return f"cannot connect ({e or 'connection refused'})"
    if isinstance(e, httpx.ReadError | httpx.WriteError):
        return f"the connection broke ({e or 'reset by the server'})"
    if isinstance(e, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return f"not a URL that can be fetched ({e})"
    return f"{type(e).__name__} {e}".rstrip()


async def _read_body(
    response: httpx.Response, url: str, max_bytes: int, count: Callable[[int], None] | None = None
) -> bytes:
    """The body, decoded, refused as soon as it passes ``max_bytes``. httpx's own decoding
    inflates each chunk whole before anyone can count it (a 2 KB gzip-in-gzip body becomes a
    GiB), so the raw bytes are read and inflated here a bounded step at a time. One gzip or
    deflate layer is decoded; a body encoded twice, or otherwise, is refused."""
    encodings = [e.strip().lower() for e in response.headers.get("content-encoding", "").split(",") if e.strip()]
    encodings = [e for e in encodings if e != "identity"]
    too_large = TooLargeError(f"{url[:200]} is larger than the {_mib(max_bytes)} limit")
    if len(encodings) > 1 or (encodings and encodings[0] not in ("gzip", "x-gzip", "deflate")):
        raise FetchError(f"{url[:200]} sent its image with Content-Encoding {', '.join(encodings)[:60]}, not plain")
    inflate = zlib.decompressobj(wbits=47) if encodings else None  # 47: a gzip or a zlib header
    body, total = bytearray(), 0
    async for raw in response.aiter_raw():
        pieces = [raw]
        if inflate is not None:
            pieces, data = [], raw
            while data:
                # at most what the cap still allows, plus one byte to know it was passed
                piece = inflate.decompress(data, max_bytes - total + 1)
                pieces.append(piece)
                total += len(piece)
                if total > max_bytes:
                    raise too_large
                data = inflate.unconsumed_tail
            total -= sum(map(len, pieces))
        for piece in pieces:
            total += len(piece)
            if total > max_bytes:
                raise too_large
            if count is not None:
                count(len(piece))
            body += piece
    if inflate is not None and not inflate.eof:
        raise FetchError(f"{url[:200]} sent a truncated {encodings[0]} body")
    return bytes(body)


async def load_image_ref(
    client: httpx.AsyncClient, ref: str, policy: FetchPolicy, count: Callable[[int], None] | None = None
) -> bytes:
    """Bytes of an image given as an http(s) URL, a data URI, or base64; ``count`` as for
    ``fetch_url`` (a data URI's bytes are counted once decoded)."""
    ref = ref.strip()
    if is_url(ref):
        return await fetch_url(client, ref, policy, count)
    if "://" in ref[:16]:
        raise ForbiddenURLError(f"refusing to fetch {ref[:100]!r}: only http and https URLs are allowed")
    data = decode_base64_image(ref, policy.max_bytes)
    if count is not None:
        count(len(data))
    return data
