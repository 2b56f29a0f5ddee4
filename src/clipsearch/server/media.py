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

# 1024: the gallery's viewer (a browser cannot show every original: HEIC, RAW, TIFF)
THUMBNAIL_SIZES = (128, 256, 512, 1024)
_EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tif",
    "HEIF": "heic",
    "AVIF": "avif",
}


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:32]


class Media:
    def __init__(self, root: Path):
        # absolute: the store records upload paths, and a server started elsewhere reads them
        self.root = Path(root).absolute()
        self.uploads = self.root / "uploads"
        self.thumbs = self.root / "thumbs"

    def upload_path(self, namespace: str, item_id: str, image_format: str | None) -> Path:
        ext = _EXTENSIONS.get(image_format or "", "img")
        return self.uploads / namespace / f"{_digest(namespace, item_id)}.{ext}"

    def save_upload(self, namespace: str, item_id: str, image_format: str | None, data: bytes) -> Path:
        path = self.upload_path(namespace, item_id, image_format)
        write_atomic(path, data)
        return path

    def is_upload(self, namespace: str, item_id: str, recorded_path: str | None) -> bool:
        """Whether ``recorded_path`` is this item's original in our uploads folder (only those are
        ever deleted: an ingested photo is the user's own file)."""
        if not recorded_path:
            return False
        path = Path(recorded_path)
        folder = self.uploads / namespace
        return path.parent == folder and path.name.startswith(_digest(namespace, item_id) + ".")

    def remove_upload(self, namespace: str, item_id: str, recorded_path: str | None) -> str | None:
        """Delete an item's uploaded original; None when it is gone, else why it was kept."""
        if not self.is_upload(namespace, item_id, recorded_path):
            return "the item's file is not an upload of this server (an ingested file stays where it is)"
        try:
            Path(recorded_path).unlink(missing_ok=True)  # type: ignore[arg-type]
        except OSError as e:
            return f"could not remove {recorded_path}: {e.strerror or e}"
        return None

    def original(self, item: Item) -> Path:
        """The file the store records for the item; NotFoundError when it has none or it is gone."""
        source = item.metadata.get("path")
        if not isinstance(source, str) or not source:
            raise NotFoundError(f"item {item.id!r} has no stored image file")
        path = Path(source)
        if not path.is_file():
            raise NotFoundError(f"the image file of item {item.id!r} is gone ({source})")
        return path

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
