"""A broken file is never embedded: it decodes completely, or it fails with an ImageError.

Valid JPEG, PNG, GIF, WebP, TIFF, HEIC and AVIF files are mutated (truncated, byte ranges zeroed
or flipped, a PNG chunk's length or CRC changed) by Hypothesis with a fixed seed. Every case must
either decode to the image Pillow's strict load gives, or raise ImageError; never another
exception and never a half-decoded picture.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipsearch.errors import ImageError
from clipsearch.imaging import _register_heif, decode_image

from ..conftest import sample_photo, write_photos

FORMATS = ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "HEIF", "AVIF"]


def _encode(fmt: str) -> bytes:
    if fmt == "HEIF":
        _register_heif()
    img = sample_photo("chelsea").resize((64, 48))
    buf = io.BytesIO()
    options = {"JPEG": {"quality": 90}, "WEBP": {"quality": 80}, "TIFF": {"compression": "tiff_deflate"}}
    img.save(buf, fmt, **options.get(fmt, {}))
    return buf.getvalue()


VALID = {fmt: _encode(fmt) for fmt in FORMATS}


def _png_chunks(data: bytes) -> list[int]:
    """Offsets of the PNG chunks' length fields."""
    offsets, pos = [], 8
    while pos + 8 <= len(data):
        offsets.append(pos)
        pos += 12 + struct.unpack(">I", data[pos : pos + 4])[0]
    return offsets


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(FORMATS))
    data = bytearray(VALID[fmt])
    kind = draw(st.sampled_from(["truncate", "zero", "flip", "png-length", "png-crc"]))
    if kind.startswith("png") and fmt != "PNG":
        kind = "zero"
    if kind == "truncate":
        cut = draw(st.integers(1, len(data) - 1))
        return fmt, bytes(data[:cut])
    if kind in ("zero", "flip"):
        start = draw(st.integers(0, len(data) - 1))
        length = draw(st.integers(1, 64))
        for i in range(start, min(len(data), start + length)):
            data[i] = 0 if kind == "zero" else data[i] ^ draw(st.integers(1, 255))
        return fmt, bytes(data)
    offset = draw(st.sampled_from(_png_chunks(bytes(data))))
    length = struct.unpack(">I", data[offset : offset + 4])[0]
    if kind == "png-length":
        data[offset : offset + 4] = struct.pack(">I", draw(st.integers(0, 2**31 - 1)))
    else:
        crc = offset + 8 + length
        data[crc : crc + 4] = struct.pack(">I", draw(st.integers(0, 2**32 - 1)))
    return fmt, bytes(data)


def _strict_pillow(data: bytes) -> np.ndarray | None:
    """The pixels Pillow's strict decode gives, or None where it refuses the file."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return np.asarray(img.convert("RGB"))
    except Exception:
        return None


@settings(
    max_examples=2500,
    deadline=None,
    derandomize=True,  # a fixed sequence of cases: the same run in CI as here
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated())
def test_a_mutated_file_decodes_completely_or_fails_with_a_reason(case):
    fmt, data = case
    for draft in (None, 224):  # the full decode, and the reduced one JPEGs take by default
        try:
            decoded = decode_image(data, draft_size=draft)
        except ImageError as e:
            assert e.message  # a reason, for the failures table
            continue
        reference = _strict_pillow(data)
        assert reference is not None, f"{fmt}: decoded what Pillow's strict load refuses"
        assert decoded.image.mode == "RGB" and decoded.image.size[0] > 0
        if draft is None and fmt not in ("GIF",):  # GIF palettes are composited differently
            assert decoded.image.size == Image.fromarray(reference).size


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_valid_format_decodes(fmt):
    d = decode_image(VALID[fmt])
    assert d.image.size == (64, 48) and d.image.mode == "RGB"
    assert d.format in (fmt, "HEIF", "AVIF")


def test_a_png_with_damaged_compressed_data_is_not_a_black_image():
    """30 zeroed bytes inside IDAT: Pillow's first load fails; reading EXIF loaded the image
    and the error was swallowed, so the next load returned half-filled pixels."""
    buf = io.BytesIO()
    sample_photo("astronaut").save(buf, "PNG")
    data = bytearray(buf.getvalue())
    at = data.find(b"IDAT") + 8 + 2000
    data[at : at + 30] = b"\0" * 30
    with pytest.raises(ImageError, match="corrupt image data"):
        decode_image(bytes(data))


def test_heic_and_avif_turned_upright_like_jpeg():
    _register_heif()
    img = sample_photo("astronaut").resize((300, 200))
    for fmt in ("HEIF", "AVIF"):
        exif = Image.Exif()
        exif[0x0112] = 6  # turned 90 degrees: the upright picture is 200 wide, 300 high
        buf = io.BytesIO()
        img.save(buf, fmt, quality=90, exif=exif.tobytes())
        d = decode_image(buf.getvalue())
        assert (d.width, d.height) == d.image.size == (200, 300), fmt


def test_the_server_refuses_a_broken_upload(tmp_path, tiny_openclip):
    import httpx

    from clipsearch.encoders import ModelSpec, load_encoder
    from clipsearch.server import ServerSettings, create_app

    from ..conftest import RunningServer

    buf = io.BytesIO()
    sample_photo("astronaut").save(buf, "PNG")
    data = bytearray(buf.getvalue())
    at = data.find(b"IDAT") + 8 + 2000
    data[at : at + 30] = b"\0" * 30
    spec = ModelSpec(weights=tiny_openclip, device="cpu")
    app = create_app(ServerSettings(db=str(tmp_path / "s.db")), lambda: (load_encoder(spec), spec))
    with RunningServer(app) as srv, httpx.Client(base_url=srv.wait_ready().url, timeout=30) as c:
        response = c.post("/embed", files={"file": ("x.png", bytes(data), "image/png")})
    assert response.status_code == 400 and "corrupt image data" in response.json()["error"]["message"]


def test_ingest_lists_heic_and_avif_and_records_a_broken_one(cli, tmp_path):
    import json

    _register_heif()
    folder = tmp_path / "phone"
    write_photos(folder, ["coffee"])
    for name, fmt in (("IMG_0001.HEIC", "HEIF"), ("web.avif", "AVIF")):
        buf = io.BytesIO()
        sample_photo("rocket").save(buf, fmt)
        (folder / name).write_bytes(buf.getvalue())
    (folder / "broken.heic").write_bytes(VALID["HEIF"][:200])
    code, out, err = cli("ingest", str(folder), "--json")
    assert code == 1, err  # some items failed
    report = json.loads(out)
    assert report["embedded"] == 3 and report["failed"] == 1
    code, out, _ = cli("failures", "--json")
    failure = json.loads(out.splitlines()[0])
    assert failure["id"].endswith("broken.heic") or "broken.heic" in json.dumps(failure)
