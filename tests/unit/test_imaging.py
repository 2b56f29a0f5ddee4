"""Decoding every kind of file people have, and preprocessing identical to open_clip's."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from clipsearch._compat import import_open_clip
from clipsearch.errors import ImageError
from clipsearch.imaging import Preprocessor, PreprocessSpec, decode_file, decode_image, resize_and_crop

from ..conftest import sample_photo, write_photos


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_plain_jpeg_keeps_size_and_colour():
    img = Image.new("RGB", (120, 80), (200, 30, 40))
    d = decode_image(_encode(img, "JPEG", quality=95))
    assert d.image.mode == "RGB"
    assert (d.width, d.height) == (120, 80)
    assert d.format == "JPEG"
    r, g, b = d.image.getpixel((60, 40))
    assert abs(r - 200) < 6 and abs(g - 30) < 6 and abs(b - 40) < 6


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is a text file, renamed to .jpg\n" * 4, "not an image"),
    ],
)
def test_unreadable_inputs_fail_with_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data)


def test_truncated_jpeg_fails_as_truncated():
    data = _encode(sample_photo("coffee"), "JPEG", quality=90)
    with pytest.raises(ImageError, match="truncated"):
        decode_image(data[: len(data) // 3])


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR (+ a tiny IDAT) claiming a huge size: a decompression bomb."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_20000x20000_png_is_refused_before_decoding():
    data = _png_header_only(20000, 20000)
    with pytest.raises(ImageError, match=r"too large: 20000x20000 is 400 MP, over the 50 MP limit"):
        decode_image(data)
    # the limit is configurable; 0 disables it (the data is then found to be truncated, not decoded)
    with pytest.raises(ImageError, match="too large"):
        decode_image(_png_header_only(5000, 5000), max_megapixels=20)


def test_real_20000x20000_png_file_is_refused(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(path, optimize=False)
    with pytest.raises(ImageError, match="20000x20000"):
        decode_file(path)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (64, 48), (0, 255, 255, 0))  # pure red in CMYK
    d = decode_image(_encode(cmyk, "JPEG", quality=95))
    assert d.image.mode == "RGB"
    r, g, b = d.image.getpixel((32, 24))
    assert r > 200 and g < 60 and b < 60


def test_16bit_greyscale_png_is_scaled_not_clipped():
    arr = np.full((40, 50), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    d = decode_image(_encode(img, "PNG"))
    value = d.image.getpixel((10, 10))
    assert d.image.mode == "RGB"
    assert 120 <= value[0] <= 135, value  # clipping would give 255


def test_palette_with_transparency_composites_on_white():
    img = Image.new("P", (30, 30), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, 15, 30))  # left half red, right half index 0 (transparent)
    img.info["transparency"] = 0
    d = decode_image(_encode(img, "PNG", transparency=0))
    assert d.image.getpixel((5, 5)) == (255, 0, 0)
    assert d.image.getpixel((25, 5)) == (255, 255, 255)


def test_rgba_and_la_transparency_become_white():
    rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 0))
    assert decode_image(_encode(rgba, "PNG")).image.getpixel((3, 3)) == (255, 255, 255)
    la = Image.new("LA", (20, 20), (0, 255))
    assert decode_image(_encode(la, "PNG")).image.getpixel((3, 3)) == (0, 0, 0)


def test_exif_rotated_jpeg_is_turned_upright():
    img = Image.new("RGB", (60, 30), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 30))  # a red stripe on the left edge as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    d = decode_image(_encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert (d.width, d.height) == (30, 60)
    assert d.image.size == (30, 60)
    r, g, b = d.image.getpixel((15, 3))  # the stripe is now at the top
    assert r > 200 and b < 60


@pytest.mark.parametrize("orientation", range(1, 9))
def test_scaled_jpeg_decode_follows_exif_orientation_like_pillow(orientation):
    """The libjpeg-turbo scaled path (simplejpeg) and Pillow's full decode + exif_transpose give
    the same upright picture, for all eight EXIF orientations."""
    img = sample_photo("astronaut").resize((1200, 800))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(img, "JPEG", quality=95, exif=exif.tobytes())
    fast = decode_image(data, draft_size=224)
    exact = decode_image(data)
    assert (fast.width, fast.height) == (exact.width, exact.height) == exact.image.size
    assert fast.image.size == ((450, 300) if orientation < 5 else (300, 450))  # 3/8 scale
    reference = np.asarray(exact.image.resize(fast.image.size, Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(np.asarray(fast.image, dtype=np.float32) - reference).mean() < 4


def test_scaled_jpeg_decode_uses_eighths_pillow_cannot():
    # 500x375: Pillow's draft would need a full decode; libjpeg-turbo decodes at 5/8
    data = _encode(sample_photo("coffee").resize((500, 375)), "JPEG", quality=90)
    d = decode_image(data, draft_size=224)
    assert d.image.size == (313, 235) and (d.width, d.height) == (500, 375)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_scaled_decode_of_other_jpeg_colour_modes(mode):
    img = sample_photo("astronaut").resize((1200, 800)).convert(mode)
    d = decode_image(_encode(img, "JPEG", quality=90), draft_size=224)
    assert d.image.mode == "RGB" and d.image.size == (600, 400)  # Pillow's draft: 1/2 scale


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    d = decode_image(buf.getvalue())
    assert d.image.getpixel((10, 10)) == (255, 0, 0)


def test_animated_webp_gives_the_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in ((0, 255, 0), (255, 0, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert decode_image(buf.getvalue()).image.getpixel((10, 10)) == (0, 255, 0)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "WEBP", "TIFF"])
def test_other_formats(fmt):
    img = Image.new("RGB", (33, 21), (10, 200, 10))
    d = decode_image(_encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert d.image.size == (33, 21) and d.image.mode == "RGB"
    g = d.image.getpixel((5, 5))[1]
    assert g > 180


def test_greyscale_and_bilevel():
    assert decode_image(_encode(Image.new("L", (8, 8), 77), "PNG")).image.getpixel((1, 1)) == (77, 77, 77)
    assert decode_image(_encode(Image.new("1", (8, 8), 1), "PNG")).image.getpixel((1, 1)) == (255, 255, 255)


def test_draft_decodes_large_jpeg_at_reduced_scale():
    big = sample_photo("astronaut").resize((3000, 2000))
    data = _encode(big, "JPEG", quality=90)
    d = decode_image(data, draft_size=224)
    assert (d.width, d.height) == (3000, 2000)  # the original size is still reported
    assert d.image.size == (375, 250)  # 1/8 scale: both edges still >= 224
    full = decode_image(data)
    assert full.image.size == (3000, 2000)
    with pytest.raises(ImageError, match="truncated"):  # broken data still says what is wrong
        decode_image(data[: len(data) // 2], draft_size=224)


@pytest.mark.parametrize(
    "spec",
    [
        PreprocessSpec(),
        PreprocessSpec(size=(64, 64), interpolation="bilinear"),
        PreprocessSpec(size=(224, 224), resize_mode="squash", mean=(0.5,) * 3, std=(0.5,) * 3),
        PreprocessSpec(size=(224, 224), resize_mode="longest", fill_color=0),
    ],
    ids=["shortest-bicubic", "small-bilinear", "squash", "longest"],
)
@pytest.mark.parametrize("size", [(451, 300), (300, 451), (224, 224), (100, 50)])
def test_preprocess_matches_open_clip_transform(spec, size):
    open_clip = import_open_clip()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    img = sample_photo("chelsea").resize(size)
    cfg = PreprocessCfg(
        size=spec.size,
        mean=spec.mean,
        std=spec.std,
        interpolation=spec.interpolation,
        resize_mode=spec.resize_mode,
        fill_color=spec.fill_color,
    )
    reference = image_transform_v2(cfg, is_train=False)(img).numpy()
    ours = Preprocessor(spec)(img)
    assert ours.shape == reference.shape == (3, *spec.size)
    assert ours.dtype == np.float32
    assert open_clip is not None
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_draft_embedding_stays_close_to_exact_reference(encoder):
    """The fast path (DCT-scaled decode + our preprocessing) vs open_clip's own transform on a
    full decode, for a 3000x2000 photo: cosine >= 0.995. A different photo must score far lower,
    or the comparison would prove nothing."""
    open_clip = import_open_clip()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    big = sample_photo("astronaut").resize((3000, 2000), Image.Resampling.BICUBIC)
    data = _encode(big, "JPEG", quality=90)
    spec = encoder.preprocess_spec

    fast = decode_image(data, draft_size=spec.draft_size)
    assert fast.image.size[0] < 1000  # it really took the reduced path
    fast_vec = encoder.embed_pixels(encoder.preprocess.batch([fast.image]))[0]

    cfg = PreprocessCfg(size=spec.size, mean=spec.mean, std=spec.std)
    exact_pixels = image_transform_v2(cfg, is_train=False)(Image.open(io.BytesIO(data)).convert("RGB"))
    with torch.inference_mode():
        exact = encoder.model.encode_image(exact_pixels.unsqueeze(0))
    exact_vec = torch.nn.functional.normalize(exact, dim=-1)[0].numpy()

    other = encoder.embed_images([sample_photo("coffee").resize((3000, 2000))])[0]
    assert float(fast_vec @ exact_vec) >= 0.995
    assert float(other @ exact_vec) < 0.95
    assert open_clip is not None


@pytest.mark.parametrize("keep", [0.5, 0.2, 200])
def test_a_truncated_heic_is_called_truncated(tmp_path, keep):
    """Point 9: a HEIC cut short was "not an image (unrecognised file format)", or a two-line
    libheif message. It is a truncated file, said in one line."""
    import io

    from pillow_heif import register_heif_opener

    from clipsearch.errors import ImageError
    from clipsearch.imaging import decode_image

    register_heif_opener()  # pillow-heif writes HEIC (the core reads it with pi-heif)
    buf = io.BytesIO()
    write_photos(tmp_path, ["coffee"])
    from PIL import Image

    Image.open(tmp_path / "coffee.jpg").save(buf, "HEIF")
    data = buf.getvalue()
    cut = data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep]
    with pytest.raises(ImageError) as e:
        decode_image(cut)
    assert str(e.value).startswith("truncated") and "\n" not in str(e.value), str(e.value)


def test_a_long_strip_costs_the_output_not_its_resize(tmp_path):
    """A 20000x2 PNG (207 bytes): scaling its short side to 224 makes a 2,240,000x224 image
    (1.5 GB) before the centre crop. Only the crop window is resampled: peak memory stays small."""
    import subprocess
    import sys

    strip = tmp_path / "strip.png"
    Image.new("RGB", (20000, 2), (200, 30, 30)).save(strip)
    code = (
        "import resource, sys; from clipsearch.imaging import Preprocessor, PreprocessSpec, decode_file;"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "crop = Preprocessor(PreprocessSpec()).crop_decoded(decode_file(sys.argv[1]));"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "print(crop.shape, crop[112, 112].tolist(), (after - before) // 1024)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(strip)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    shape, _, rest = done.stdout.partition(")")
    pixel, _, grown_mib = rest.rpartition(" ")
    assert shape == "(224, 224, 3" and pixel.strip() == "[200, 30, 30]"
    assert int(grown_mib) < 64, f"+{grown_mib} MiB"


def test_the_window_gives_the_pixels_of_the_whole_resize():
    rng = np.random.default_rng(3)
    strip = Image.fromarray(rng.integers(0, 255, (24, 3000, 3), dtype=np.uint8))  # 28000x224 resized
    spec = PreprocessSpec()
    ours = np.asarray(resize_and_crop(strip, spec), dtype=np.int16)
    scale = 224 / 24
    whole = strip.resize((int(3000 * scale), 224), Image.BICUBIC)
    left = round((whole.width - 224) / 2.0)
    reference = np.asarray(whole.crop((left, 0, left + 224, 224)), dtype=np.int16)
    difference = np.abs(ours - reference)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.001
