"""Image decoding and preprocessing: bytes -> upright RGB image -> model input array.

Every rule about turning a file into pixels lives here: EXIF orientation, colour modes
(transparency composited on white, palette, LA, CMYK, 16-bit, greyscale), the first frame of
animations, the decompression-bomb limit, and DCT-scaled JPEG decoding (libjpeg-turbo through
simplejpeg, Pillow's draft mode where simplejpeg does not apply). Preprocessing mirrors
open_clip's eval transform (resize, centre crop, normalise) with Pillow and numpy only, so the
hot path needs no torchvision.
"""

from __future__ import annotations

import functools
import io
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageError, TooLargeError, option

# Our own --max-megapixels check runs on the header before any pixel is decoded; Pillow's
# global limit would otherwise refuse (or warn about) images the user explicitly allowed.
Image.MAX_IMAGE_PIXELS = None
# A truncated file must fail with a reason, never be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# camera RAW files, read through LibRaw (rawpy)
RAW_EXTENSIONS = frozenset(
    {".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".orf", ".rw2", ".raf", ".pef",
     ".srw", ".rwl", ".3fr", ".erf", ".kdc", ".mrw", ".x3f", ".iiq", ".mos"}
)  # fmt: skip
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
    | RAW_EXTENSIONS
)
# ISO-BMFF brands of HEIF images (iPhones write heic); AVIF (avif, avis) is Pillow's own
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"mif2"}
DEFAULT_MAX_MEGAPIXELS = 50.0

_INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
# EXIF orientations 5..8 rotate by 90 degrees, so width and height swap.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
# How to make an image with each EXIF orientation upright (as ImageOps.exif_transpose does).
_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class PreprocessSpec:
    """How a model wants its input: the fields of open_clip's PreprocessCfg."""

    size: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # shortest | longest | squash
    fill_color: int = 0
    # transformers' processors resize the short edge to their own length ("shortest_edge", e.g.
    # 256) before cropping (e.g. 224); 0: to the crop size, as open_clip does
    resize_edge: int = 0
    # where a centre crop starts when the margin is odd: open_clip (torchvision) rounds, the
    # transformers processors floor
    crop_rounding: str = "round"

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"unknown resize mode {self.resize_mode!r}")
        if self.crop_rounding not in ("round", "floor"):
            raise ValueError(f"unknown crop rounding {self.crop_rounding!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        size = data.get("size", 224)
        size = (int(size), int(size)) if isinstance(size, int | float) else (int(size[0]), int(size[1]))
        return cls(
            size=size,
            mean=tuple(float(x) for x in data.get("mean", cls.mean)),  # type: ignore[arg-type]
            std=tuple(float(x) for x in data.get("std", cls.std)),  # type: ignore[arg-type]
            interpolation=str(data.get("interpolation", "bicubic")),
            resize_mode=str(data.get("resize_mode", "shortest")),
            fill_color=int(data.get("fill_color", 0)),
            resize_edge=int(data.get("resize_edge", 0)),
            crop_rounding=str(data.get("crop_rounding", "round")),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = [round(x, 8) for x in self.mean]
        d["std"] = [round(x, 8) for x in self.std]
        # recorded only when they differ from open_clip's way, so that the identities of
        # namespaces made before these fields existed stay equal
        if not self.resize_edge:
            del d["resize_edge"]
        if self.crop_rounding == "round":
            del d["crop_rounding"]
        return d

    @property
    def draft_size(self) -> int:
        """Smallest edge a DCT-scaled decode may produce for this spec: twice the edge it is
        resized to, so that the resize, not the DCT scaling, does the last factor of two. With
        the DCT scaling alone bringing a photo down to the model's size, sensitive models (the
        tests' small ones, at 32 and 224 pixels) drifted to cosine 0.980 from the full decode on
        web-sized photos; at twice the size the worst of 150 ImageNet photos is 0.9990
        (open_clip 0.9998), inside the fast decode's bound of 0.995."""
        return 2 * max(*self.size, self.resize_edge)


@dataclass
class DecodedImage:
    """An upright RGB image plus facts about the original file.

    A JPEG decoded at reduced scale is ``M/8`` of the original, rounded up to whole pixels: its
    last row and column cover only part of a pixel. ``box`` is the region of ``image`` that
    covers the original exactly (``(0, 0, width·M/8, height·M/8)``, turned upright with the
    image), so that resizing can compute its geometry from the original size, as a full decode
    would; None when ``image`` is the original at full size.
    """

    image: Image.Image
    width: int  # of the original, after EXIF orientation
    height: int
    format: str | None
    box: tuple[float, float, float, float] | None = None
    photo: dict[str, Any] = field(default_factory=dict)  # photo_facts: what its EXIF says


def check_megapixels(width: int, height: int, max_megapixels: float) -> None:
    """TooLargeError for a picture over ``max_megapixels`` (0: no limit), read from its header."""
    megapixels = width * height / 1e6
    if max_megapixels > 0 and megapixels > max_megapixels:
        raise TooLargeError(
            f"image too large: {width}x{height} is {megapixels:.0f} MP, over the {max_megapixels:g} MP "
            f"limit (raise {option('max_megapixels')} to allow it)"
        )


def decode_image(
    data: bytes,
    *,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    draft_size: int | None = None,
) -> DecodedImage:
    """Decode image bytes to an upright RGB image; raise ImageError with the reason otherwise.

    ``draft_size`` lets a JPEG decode at 1/2, 1/4 or 1/8 scale (DCT scaling) as long as both
    edges stay at least that long: far cheaper than a full decode followed by a big resize.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        _register_heif()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # a RAW Pillow cannot read: its own format, or a TIFF container of sensor data (a DNG)
        if _raw_signature(data) or data[:4] in _TIFF_MAGICS:
            return _decode_raw(data, None, max_megapixels, draft_size)
        if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
            # the file says it is HEIF, but libheif cannot read even its header: cut short
            raise ImageError("truncated HEIC/HEIF file (its header is incomplete)") from None
        raise ImageError("not an image (unrecognised file format)") from None
    except (OSError, ValueError, SyntaxError, EOFError, RuntimeError) as e:
        # RuntimeError: what the AVIF and HEIF decoders (libavif, libheif) raise on bad data
        raise ImageError(f"unreadable image header: {e or type(e).__name__}") from None
    if img.format == "TIFF" and _is_raw_tiff(data, img):
        return _decode_raw(data, img, max_megapixels, draft_size)

    width, height = img.size
    check_megapixels(width, height, max_megapixels)
    fmt = img.format
    raw_size = img.size
    # A JPEG's EXIF sits in its header, so its orientation is known before decoding (the reduced
    # decode needs it). Other formats may keep EXIF after the pixels (a PNG's eXIf chunk):
    # reading it there would load the image, so they are decoded, strictly, first.
    orientation = _exif_orientation(img) if fmt == "JPEG" else None
    photo = photo_facts(img) if fmt == "JPEG" else {}
    if fmt == "JPEG" and draft_size and img.mode == "RGB":
        scaled = _decode_jpeg_scaled(data, draft_size)
        if scaled is not None:
            box = _content_box(raw_size, scaled.size, orientation)
            if orientation in _TRANSPOSES:
                scaled = scaled.transpose(_TRANSPOSES[orientation])
            width, height = _upright(raw_size, orientation)
            return DecodedImage(image=scaled, width=width, height=height, format=fmt, box=box, photo=photo)

    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        if draft_size and fmt == "JPEG":
            img.draft(img.mode, (draft_size, draft_size))
        img.load()
    except (OSError, ValueError, SyntaxError, EOFError, RuntimeError, Image.DecompressionBombError) as e:
        msg = " ".join(str(e).split())  # libheif's messages end in a newline: one line
        if "truncated" in msg or "broken data stream" in msg or "end of file" in msg.lower():
            raise ImageError(f"truncated image data ({msg})") from None
        raise ImageError(f"corrupt image data ({msg or type(e).__name__})") from None
    if fmt != "JPEG":
        orientation = _exif_orientation(img)
        photo = photo_facts(img)

    box = _content_box(raw_size, img.size, orientation) if img.size != raw_size else None
    if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
    width, height = _upright(raw_size, orientation)
    return DecodedImage(image=to_rgb(img), width=width, height=height, format=fmt, box=box, photo=photo)


# RAW formats Pillow does not open: Fujifilm RAF, Olympus ORF, Panasonic RW2, Canon CR3 (ISO BMFF)
_RAW_MAGICS = (b"FUJIFILMCCD-RAW", b"IIRO", b"IIRS", b"MMOR", b"IIU\x00")
_RAW_BRANDS = {b"crx "}
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*")
# LibRaw's flip as the EXIF orientation that names the same turn
_RAW_FLIPS = {0: 1, 3: 3, 5: 8, 6: 6}


def _raw_signature(data: bytes) -> bool:
    return data.startswith(_RAW_MAGICS) or (data[4:8] == b"ftyp" and data[8:12] in _RAW_BRANDS)


def _is_raw_tiff(data: bytes, img: Image.Image) -> bool:
    """A TIFF container that holds a camera RAW: a DNG (DNGVersion), sensor data (CFA), a Canon
    CR2 ("CR" after the header), or a first page that is only a reduced preview of the picture
    (NEF, ARW, PEF and the like put the RAW data in later pages)."""
    tags = getattr(img, "tag_v2", {})
    return 50706 in tags or tags.get(262) in (32803, 34892) or data[8:10] == b"CR" or tags.get(254) == 1


def _decode_raw(data: bytes, img: Image.Image | None, max_megapixels: float, draft_size: int | None) -> DecodedImage:
    """A camera RAW file through LibRaw: its embedded JPEG preview when that is at least
    ``draft_size`` on its short edge (a JPEG decode instead of a demosaic: many times faster),
    else a demosaic at half size when that is large enough, else at full size (always full for
    ``--decode exact``, where ``draft_size`` is None). Turned upright by the camera's
    orientation; the megapixel limit applies to the sensor size, read before any decoding."""
    import rawpy

    photo = photo_facts(img) if img is not None else {}
    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            sizes = raw.sizes
            orientation = _RAW_FLIPS.get(sizes.flip, 1)
            width, height = _upright((sizes.width, sizes.height), orientation)
            check_megapixels(width, height, max_megapixels)
            image = _raw_preview(raw, orientation, draft_size) if draft_size else None
            if image is None:
                half = draft_size is not None and min(width, height) // 2 >= draft_size
                # LibRaw turns the picture upright itself (its user_flip follows the camera)
                pixels = raw.postprocess(half_size=half, use_camera_wb=True, output_bps=8)
                image = Image.fromarray(pixels)
    except (rawpy.LibRawError, OSError, ValueError) as e:
        raise ImageError(f"unreadable RAW file ({e or type(e).__name__})") from None
    return DecodedImage(image=to_rgb(image), width=width, height=height, format="RAW", photo=photo)


def _raw_preview(raw: Any, orientation: int, min_edge: int) -> Image.Image | None:
    """The RAW file's embedded JPEG preview, upright, if its short edge is at least ``min_edge``."""
    import rawpy

    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    if thumb.format != rawpy.ThumbFormat.JPEG:
        return None
    try:
        preview = Image.open(io.BytesIO(thumb.data))
        if min(preview.size) < min_edge:
            return None
        preview.load()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None  # a damaged preview: the sensor data may still be whole
    # a preview is stored as the sensor saw it; the RAW file's orientation turns it upright
    return preview.transpose(_TRANSPOSES[orientation]) if orientation in _TRANSPOSES else preview


@functools.cache
def _register_heif() -> None:
    """Teach Pillow HEIC/HEIF (pi-heif: pillow-heif without its encoders), the first time one is
    met: importing libheif costs 40 ms that a text query should not pay. It applies the file's
    rotation itself and reports the upright size (its EXIF orientation then reads 1)."""
    from pi_heif import register_heif_opener

    register_heif_opener()


def _upright(size: tuple[int, int], orientation: int | None) -> tuple[int, int]:
    """(width, height) of the original once turned upright."""
    return (size[1], size[0]) if orientation in _TRANSPOSED_ORIENTATIONS else size


def _content_box(
    original: tuple[int, int], reduced: tuple[int, int], orientation: int | None
) -> tuple[float, float, float, float] | None:
    """The region of a reduced-scale decode that covers the original (see ``DecodedImage``),
    after the image is turned upright by ``orientation``. libjpeg's scaled sizes are
    ``ceil(edge·M/8)`` for M in 1..8 (Pillow's draft uses 1/2, 1/4, 1/8 of the same kind)."""
    (w, h), (rw, rh) = original, reduced
    for m in range(1, 9):
        if -(-w * m // 8) == rw and -(-h * m // 8) == rh:
            x, y = w * m / 8, h * m / 8
            break
    else:
        return None
    # the content starts at the top-left of the stored image; a flip or a turn moves it
    flip_x = orientation in (2, 3, 7, 8)  # the stored x axis runs the other way after it
    flip_y = orientation in (3, 4, 6, 7)
    x0, x1 = (rw - x, rw) if flip_x else (0.0, x)
    y0, y1 = (rh - y, rh) if flip_y else (0.0, y)
    if orientation in _TRANSPOSED_ORIENTATIONS:
        return (y0, x0, y1, x1)
    return (x0, y0, x1, y1)


def _decode_jpeg_scaled(data: bytes, min_edge: int) -> Image.Image | None:
    """Colour JPEG decoded by libjpeg-turbo (simplejpeg) at the smallest M/8 scale that keeps
    both edges at least ``min_edge`` long. Pillow's draft only knows 1/2, 1/4 and 1/8, so a
    500x375 photo would be decoded in full; here it is decoded at 5/8. None when simplejpeg
    cannot decode the file (broken data, or a variant it does not support): Pillow then decodes
    it and reports what is wrong."""
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_edge, min_width=min_edge)
    except ValueError:
        return None
    return Image.fromarray(pixels)


def decode_file(path: str | Path, **kwargs: Any) -> DecodedImage:
    """Read and decode one file; unreadable files raise ImageError too."""
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        raise ImageError(f"{path} is a directory, not an image") from None
    except FileNotFoundError:
        raise ImageError(f"{path} does not exist") from None
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror or e}") from None
    return decode_image(data, **kwargs)


def make_thumbnail(image: Image.Image, max_edge: int = 256, quality: int = 85) -> bytes:
    """A JPEG no larger than ``max_edge`` on either side, aspect ratio kept."""
    thumb = to_rgb(image).copy()
    thumb.thumbnail((max_edge, max_edge), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        value = img.getexif().get(0x0112)
    except Exception:  # a broken EXIF block must not cost us the picture
        return None
    return int(value) if isinstance(value, int) else None


_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_DATETIME_ORIGINAL, _DATETIME_DIGITIZED, _DATETIME, _OFFSET_ORIGINAL = 0x9003, 0x9004, 0x0132, 0x9011
_MAKE, _MODEL = 0x010F, 0x0110
_OFFSET_RE = re.compile(r"^[+-]\d{2}:\d{2}$")


def photo_facts(img: Image.Image) -> dict[str, Any]:
    """What a photo's EXIF says, as stored metadata: ``taken_at`` (DateTimeOriginal, else
    DateTimeDigitized, else DateTime, as ISO 8601 with its UTC offset when the camera wrote
    one), ``camera_make``, ``camera_model``, ``gps_lat`` and ``gps_lon`` (signed decimal
    degrees). Facts that are absent or malformed are left out; a broken EXIF block gives none."""
    try:
        exif = img.getexif()
        sub = exif.get_ifd(_EXIF_IFD)
        gps = exif.get_ifd(_GPS_IFD)
    except Exception:  # a broken EXIF block must not cost us the picture
        return {}
    facts: dict[str, Any] = {}
    for tag in (_DATETIME_ORIGINAL, _DATETIME_DIGITIZED, _DATETIME):
        taken = _exif_datetime(sub.get(tag) if tag != _DATETIME else exif.get(tag))
        if taken:
            offset = _exif_text(sub.get(_OFFSET_ORIGINAL)) if tag == _DATETIME_ORIGINAL else None
            facts["taken_at"] = taken + (offset if offset and _OFFSET_RE.match(offset) else "")
            break
    for key, tag in (("camera_make", _MAKE), ("camera_model", _MODEL)):
        text = _exif_text(exif.get(tag))
        if text:
            facts[key] = text
    lat, lon = _gps_degrees(gps.get(2), gps.get(1), 90), _gps_degrees(gps.get(4), gps.get(3), 180)
    if lat is not None and lon is not None:
        facts["gps_lat"], facts["gps_lon"] = lat, lon
    return facts


def _exif_text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    text = value.replace("\x00", "").strip()
    return text or None


def _exif_datetime(value: Any) -> str | None:
    """``2024:06:01 12:30:00`` as ``2024-06-01T12:30:00``; None for blanks and impossible dates
    (cameras with no clock write ``0000:00:00 00:00:00``)."""
    text = _exif_text(value)
    if not text:
        return None
    try:
        return datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S").isoformat()
    except ValueError:
        return None


def _gps_degrees(value: Any, ref: Any, limit: int) -> float | None:
    """Degrees, minutes, seconds (three rationals) and N/S/E/W as signed decimal degrees."""
    try:
        d, m, sec = (float(x) for x in value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    degrees = d + m / 60 + sec / 3600
    if not math.isfinite(degrees) or degrees > limit:
        return None
    return round(-degrees if _exif_text(ref) in ("S", "W") else degrees, 7)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparent pixels become white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(img))).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "L" and "transparency" in img.info:
        return to_rgb(img.convert("LA"))
    return img.convert("RGB")


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """High bit-depth greyscale to 8 bits by scaling (Pillow's convert would clip at 255)."""
    arr = arr.astype(np.float64)
    hi = float(arr.max(initial=0.0))
    if np.issubdtype(arr.dtype, np.floating) and hi <= 1.0:
        scale = 255.0  # float images are conventionally 0..1
    elif hi <= 255:
        scale = 1.0
    elif hi <= 65535:
        scale = 255.0 / 65535.0
    else:
        scale = 255.0 / hi
    return np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)


# a resize to at most this many times the output's pixels is done whole, then cropped: exactly the
# reference's pixels, for every photo and panorama; beyond it only the crop window is resampled
_WHOLE_RESIZE_LIMIT = 16


def resize_and_crop(
    img: Image.Image,
    spec: PreprocessSpec,
    *,
    original: tuple[int, int] | None = None,
    box: tuple[float, float, float, float] | None = None,
) -> Image.Image:
    """Geometry of the model's eval transform (open_clip's, or a transformers processor's), on a
    PIL image, with the same rounding. For a reduced-scale decode, ``original`` is the full
    size and ``box`` the region of ``img`` covering it: the output size and crop are computed
    from the original, as a full decode would give them, and the resize reads exactly ``box``."""
    th, tw = spec.size
    w, h = original or img.size
    if box is None:
        box = (0.0, 0.0, float(img.width), float(img.height))
    same = box == (0.0, 0.0, float(w), float(h)) and img.size == (w, h)
    resample = _INTERPOLATIONS[spec.interpolation]

    def resize(size: tuple[int, int]) -> Image.Image:
        return img if same and size == (w, h) else img.resize(size, resample, box=box)

    if spec.resize_mode == "squash":
        return resize((tw, th))
    if spec.resize_mode == "shortest":
        edge = spec.resize_edge or (th if th == tw else 0)
        if edge:
            # torchvision Resize(int) and transformers' shortest_edge: the short edge becomes
            # ``edge``, the long edge is truncated.
            if w <= h:
                new_w, new_h = edge, int(edge * h / w)
            else:
                new_w, new_h = int(edge * w / h), edge
        else:
            ratio = min(h / th, w / tw)
            new_w, new_h = round(w / ratio), round(h / ratio)
        if spec.crop_rounding == "floor":
            left, top = (new_w - tw) // 2, (new_h - th) // 2
        else:
            left, top = round((new_w - tw) / 2.0), round((new_h - th) / 2.0)
        if new_w * new_h <= _WHOLE_RESIZE_LIMIT * tw * th:
            return resize((new_w, new_h)).crop((left, top, left + tw, top + th))
        # A strip far longer than wide: only the crop window is resampled. Pillow weighs each
        # output pixel from its centre, the scale and the filter's support over the whole
        # source, whatever the box, so these are the pixels of resizing it all and cropping (but
        # for a rare 1-step rounding difference), in work and memory bounded by the output. (A
        # 20000x2 strip resized whole is a 2,240,000x224 image: 1.5 GB.)
        x0, y0, x1, y1 = box
        sx, sy = (x1 - x0) / new_w, (y1 - y0) / new_h
        window = (x0 + left * sx, y0 + top * sy, x0 + (left + tw) * sx, y0 + (top + th) * sy)
        return img.resize((tw, th), resample, box=window)
    # longest: fit inside the target, pad the rest with fill_color (open_clip ResizeKeepRatio +
    # CenterCropOrPad).
    ratio = max(h / th, w / tw)
    new_w, new_h = max(1, round(w / ratio)), max(1, round(h / ratio))
    img = resize((new_w, new_h))
    canvas = Image.new("RGB", (tw, th), (spec.fill_color,) * 3)
    canvas.paste(img, ((tw - new_w) // 2, (th - new_h) // 2))
    return canvas


class Preprocessor:
    """Turns RGB images into normalised float32 (3, H, W) model input, in two steps: ``crop``
    (resize + centre crop to uint8 (H, W, 3), per image, in the decode workers) and ``normalize``
    (a whole batch at once, where the model runs; on a GPU that is the device, and the uint8
    crops cross the bus at a quarter of the float size)."""

    def __init__(self, spec: PreprocessSpec):
        self.spec = spec
        std = np.asarray(spec.std, dtype=np.float32)
        # (x / 255 - mean) / std  ==  x * scale + offset, one fused pass over the pixels.
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)
        self.offset = (-np.asarray(spec.mean, dtype=np.float32) / std).astype(np.float32)

    def crop(self, img: Image.Image) -> np.ndarray:
        return np.asarray(resize_and_crop(to_rgb(img), self.spec), dtype=np.uint8)

    def crop_decoded(self, decoded: DecodedImage) -> np.ndarray:
        """``crop`` for a decode, reduced-scale or not: the geometry of the original's."""
        if decoded.box is None:
            return self.crop(decoded.image)
        img = resize_and_crop(
            to_rgb(decoded.image), self.spec, original=(decoded.width, decoded.height), box=decoded.box
        )
        return np.asarray(img, dtype=np.uint8)

    def normalize(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, 3, H, W)."""
        arr = crops.astype(np.float32) * self.scale + self.offset
        return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))

    def __call__(self, img: Image.Image) -> np.ndarray:
        return self.normalize(self.crop(img)[None])[0]

    def batch(self, images: list[Image.Image]) -> np.ndarray:
        th, tw = self.spec.size
        if not images:
            return np.zeros((0, 3, th, tw), dtype=np.float32)
        return self.normalize(np.stack([self.crop(img) for img in images]))
