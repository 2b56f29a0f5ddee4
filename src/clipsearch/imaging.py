"""Image decoding and preprocessing: bytes -> upright RGB image -> model input array.

Every rule about turning a file into pixels lives here: EXIF orientation, colour modes
(transparency composited on white, palette, LA, CMYK, 16-bit, greyscale), the first frame of
animations, the decompression-bomb limit, and DCT-scaled JPEG decoding (libjpeg-turbo through
simplejpeg, Pillow's draft mode where simplejpeg does not apply). Preprocessing mirrors
open_clip's eval transform (resize, centre crop, normalise) with Pillow and numpy only, so the
hot path needs no torchvision.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageError, TooLargeError

# Our own --max-megapixels check runs on the header before any pixel is decoded; Pillow's
# global limit would otherwise refuse (or warn about) images the user explicitly allowed.
Image.MAX_IMAGE_PIXELS = None
# A truncated file must fail with a reason, never be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
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

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"unknown resize mode {self.resize_mode!r}")

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
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = [round(x, 8) for x in self.mean]
        d["std"] = [round(x, 8) for x in self.std]
        return d

    @property
    def draft_size(self) -> int:
        """Smallest edge a DCT-scaled decode may produce without losing detail for this spec."""
        return max(self.size)


@dataclass
class DecodedImage:
    """An upright RGB image plus facts about the original file."""

    image: Image.Image
    width: int  # of the original, after EXIF orientation
    height: int
    format: str | None


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised file format)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"unreadable image header: {e}") from None

    width, height = img.size
    megapixels = width * height / 1e6
    if max_megapixels > 0 and megapixels > max_megapixels:
        raise TooLargeError(
            f"image too large: {width}x{height} is {megapixels:.0f} MP, over the {max_megapixels:g} MP "
            "limit (raise --max-megapixels to allow it)"
        )
    orientation = _exif_orientation(img)
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    fmt = img.format

    scaled = _decode_jpeg_scaled(data, draft_size) if draft_size and fmt == "JPEG" and img.mode == "RGB" else None
    if scaled is not None:
        if orientation in _TRANSPOSES:
            scaled = scaled.transpose(_TRANSPOSES[orientation])
        return DecodedImage(image=scaled, width=width, height=height, format=fmt)

    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        if draft_size and fmt == "JPEG":
            img.draft(img.mode, (draft_size, draft_size))
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        msg = str(e)
        if "truncated" in msg or "broken data stream" in msg:
            raise ImageError(f"truncated image data ({msg})") from None
        raise ImageError(f"corrupt image data ({msg})") from None

    if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
    return DecodedImage(image=to_rgb(img), width=width, height=height, format=fmt)


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


def resize_and_crop(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Geometry of open_clip's eval transform, on a PIL image, with the same rounding."""
    th, tw = spec.size
    w, h = img.size
    resample = _INTERPOLATIONS[spec.interpolation]
    if spec.resize_mode == "squash":
        return img if (w, h) == (tw, th) else img.resize((tw, th), resample)
    if spec.resize_mode == "shortest":
        if th == tw:
            # torchvision Resize(int): the short edge becomes th, the long edge is truncated.
            if w <= h:
                new_w, new_h = th, int(th * h / w)
            else:
                new_w, new_h = int(th * w / h), th
        else:
            ratio = min(h / th, w / tw)
            new_w, new_h = round(w / ratio), round(h / ratio)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample)
        left = round((new_w - tw) / 2.0)
        top = round((new_h - th) / 2.0)
        return img.crop((left, top, left + tw, top + th))
    # longest: fit inside the target, pad the rest with fill_color (open_clip ResizeKeepRatio +
    # CenterCropOrPad).
    ratio = max(h / th, w / tw)
    new_w, new_h = max(1, round(w / ratio)), max(1, round(h / ratio))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)
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
