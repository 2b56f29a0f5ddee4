"""Files the server keeps beside the store: uploaded originals and cached thumbnails.

Paths here are always derived from digests, never from ids or metadata a client sent, so no
request can name a file outside this folder. A thumbnail is read from the file the store
records for the item (its ``path`` metadata), so only items of the store can be read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import ImageError, NotFoundError
from ..files import write_atomic
from ..imaging import decode_file, make_thumbnail
from ..store import Item

THUMBNAIL_SIZES = (128, 256, 512)
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:32]


class Media:
    def __init__(self, root: Path):
        self.root = root
        self.uploads = root / "uploads"
        self.thumbs = root / "thumbs"

    def upload_path(self, namespace: str, item_id: str, image_format: str | None) -> Path:
        ext = _EXTENSIONS.get(image_format or "", "img")
        return self.uploads / namespace / f"{_digest(namespace, item_id)}.{ext}"

    def save_upload(self, namespace: str, item_id: str, image_format: str | None, data: bytes) -> Path:
        path = self.upload_path(namespace, item_id, image_format)
        write_atomic(path, data)
        return path

    def remove_upload(self, namespace: str, item_id: str, recorded_path: str | None) -> None:
        """Delete an uploaded original, but only one inside our uploads folder."""
        if not recorded_path:
            return
        path = Path(recorded_path)
        folder = self.uploads / namespace
        if path.parent == folder and path.name.startswith(_digest(namespace, item_id) + "."):
            path.unlink(missing_ok=True)

    def thumbnail(self, item: Item, size: int) -> bytes:
        if size not in THUMBNAIL_SIZES:
            raise ImageError(f"thumbnail size must be one of {', '.join(map(str, THUMBNAIL_SIZES))}")
        cached = self.thumbs / item.namespace / f"{_digest(item.id, item.sha256 or '', str(size))}.jpg"
        if cached.is_file():
            return cached.read_bytes()
        source = item.metadata.get("path")
        if not isinstance(source, str) or not source:
            raise NotFoundError(f"item {item.id!r} has no stored image file")
        try:
            decoded = decode_file(source, draft_size=size)
        except ImageError as e:
            raise NotFoundError(f"the image of item {item.id!r} cannot be read: {e.message}") from None
        data = make_thumbnail(decoded.image, size)
        write_atomic(cached, data)
        return data
