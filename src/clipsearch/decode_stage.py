"""The decode stage of ingest: read one item's bytes, hash them, decode and crop the image.

It runs in worker threads or worker processes (``--worker-type``), so it imports nothing heavy
(no torch, no store): a spawned process starts in a fraction of a second and holds only Pillow,
simplejpeg and numpy. Its results are small picklable records; the pipeline turns them into
store rows. Normalisation is left to the encoder, per batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ImageError
from .imaging import DEFAULT_MAX_MEGAPIXELS, DecodedImage, Preprocessor, PreprocessSpec, decode_image
from .sources import SourceItem

if TYPE_CHECKING:
    from .encoders.interface import Encoder


DECODE_MODES = ("fast", "exact")


@dataclass(frozen=True)
class DecodeSettings:
    spec: PreprocessSpec
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    # fast: JPEGs decoded at reduced (DCT) scale; exact: full decode, the reference's pixels
    decode: str = "fast"

    @classmethod
    def for_encoder(cls, encoder: Encoder, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> DecodeSettings:
        """How ``encoder``'s images are decoded: its preprocessing and its identity's decode mode,
        so that every path (ingest, queries, the server, the worker, Ray) decodes alike."""
        return cls(encoder.preprocess_spec, max_megapixels, encoder.identity.decode)


@dataclass
class Decoded:
    sha256: str
    size: int
    width: int  # of the original, upright
    height: int
    crop: np.ndarray  # uint8 (H, W, 3), ready for Preprocessor.normalize
    photo: dict[str, Any] = field(default_factory=dict)  # imaging.photo_facts


@dataclass
class Unchanged:
    """The bytes hash to what the store already holds: nothing to decode."""

    sha256: str
    size: int


def failure_reason(e: BaseException) -> str:
    """Why an item failed, as recorded: an ImageError's own reason, else what went wrong. The one
    wording for every path that decodes (local ingest, Ray's decode tasks, the table worker)."""
    from concurrent.futures.process import BrokenProcessPool

    if isinstance(e, ImageError):
        return e.message
    if isinstance(e, MemoryError):
        return "out of memory while decoding"
    if isinstance(e, BrokenProcessPool):
        return "the decoder process crashed on this file"
    return f"unexpected {type(e).__name__}: {e}"


def read_bytes(read: Callable[[], bytes]) -> bytes:
    """``read()``, with what can go wrong reading a file as the recorded reason (ImageError)."""
    try:
        return read()
    except FileNotFoundError:
        raise ImageError("file does not exist") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not a file") from None
    except OSError as e:
        raise ImageError(f"cannot read file ({e.strerror or e})") from None


@lru_cache(maxsize=8)
def _preprocessor(spec: PreprocessSpec) -> Preprocessor:
    return Preprocessor(spec)


def decode_item(item: SourceItem, known_sha256: str | None, settings: DecodeSettings) -> Decoded | Unchanged:
    """Read, hash and (if new or changed) decode + crop one item; ImageError says why not."""
    data = read_bytes(item.read)
    digest = hashlib.sha256(data).hexdigest()
    if known_sha256 == digest:
        return Unchanged(digest, len(data))
    decoded, crop = decode_crop(data, settings)
    return Decoded(digest, len(data), decoded.width, decoded.height, crop, decoded.photo)


def decode_crop(data: bytes, settings: DecodeSettings) -> tuple[DecodedImage, np.ndarray]:
    """Decode image bytes and crop them for the model, the one way every path does it (ingest,
    the server, the worker), so that a stored image searched by itself scores 1.0; ImageError
    says why not."""
    spec = settings.spec
    draft = spec.draft_size if settings.decode == "fast" else None
    decoded = decode_image(data, max_megapixels=settings.max_megapixels, draft_size=draft)
    return decoded, _preprocessor(spec).crop_decoded(decoded)
