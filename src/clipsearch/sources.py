"""Sources: where items to ingest come from, and the metadata each one starts with.

``DIR`` / ``images:DIR`` walks a folder (recursive by default, symlink cycles are cut),
``image-list:FILE`` reads ``path[,label[,more...]]`` lines, and ``catalog:FILE`` reads a product
table (see ``catalog``). A source only lists items; downloading, reading, decoding and embedding
happen in the pipeline.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import ImageError, UsageError
from .filters import matcher
from .imaging import IMAGE_EXTENSIONS


@dataclass
class SourceItem:
    """One thing to embed: a stable id, where its bytes are, and its starting metadata.

    ``fingerprint`` digests what the source says about the item (its location, metadata and
    text): when it and the file's size and mtime match the store, the item is skipped unread.
    An item with a ``url`` gets its ``path`` once the download cache holds it.
    """

    id: str
    source: str  # shown to the user and recorded with failures
    path: Path | None
    metadata: dict[str, Any] = field(default_factory=dict)
    size: int | None = None
    mtime_ns: int | None = None
    url: str | None = None
    text: str | None = None  # the catalog's --text-columns, for keyword search and --embed-text
    fingerprint: str | None = None
    error: str | None = None  # the source already knows this item cannot be ingested

    def downloaded_to(self, path: Path) -> None:
        """The item's URL is at ``path`` now (the download cache): read and thumbnail it there."""
        self.path = path
        self.metadata["path"] = str(path)

    def read(self) -> bytes:
        if self.path is None:
            raise ImageError("the image was not downloaded")
        return self.path.read_bytes()


# files that hold lists of images, never an image: given as a SOURCE, they get a hint
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(blob.encode("utf-8", "surrogateescape")).hexdigest()[:20]


class Source(Protocol):
    description: str

    def __iter__(self) -> Iterator[SourceItem]: ...


def file_id(path: Path) -> str:
    """Stable id of a file item: a digest of its absolute path (URL-safe, fixed length)."""
    return hashlib.sha1(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def file_item(path: Path, extra: dict[str, Any] | None = None) -> SourceItem:
    path = Path(os.path.abspath(path))
    error = None
    try:
        st = path.stat()
        size, mtime = st.st_size, st.st_mtime_ns
        if stat.S_ISDIR(st.st_mode):
            error = "is a directory, not a file"
        elif not stat.S_ISREG(st.st_mode):
            error = "not a regular file"  # a FIFO or a device would block or never end
    except FileNotFoundError:
        size = mtime = None
        error = "file does not exist"  # a broken symbolic link too
    except OSError as e:
        size = mtime = None
        # a symbolic link loop, or a path through one
        error = "file does not exist" if e.errno == errno.ELOOP else f"cannot read file ({e.strerror or e})"
    metadata: dict[str, Any] = {
        "type": "image",
        "filename": path.name,
        "path": str(path),
        "extension": path.suffix.lower().lstrip("."),
    }
    if extra:
        metadata.update(extra)
    return SourceItem(
        id=file_id(path),
        source=str(path),
        path=path,
        metadata=metadata,
        size=size,
        mtime_ns=mtime,
        fingerprint=fingerprint(metadata),
        error=error,
    )


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class FolderSource:
    def __init__(self, root: Path, recursive: bool = True):
        self.root = root
        self.recursive = recursive
        self.description = f"images:{root}"

    def __iter__(self) -> Iterator[SourceItem]:
        seen_dirs: set[tuple[int, int]] = set()
        yield from self._walk(Path(os.path.abspath(self.root)), seen_dirs)

    def _walk(self, folder: Path, seen: set[tuple[int, int]]) -> Iterator[SourceItem]:
        try:
            st = folder.stat()
        except OSError:
            return
        key = (st.st_dev, st.st_ino)
        if key in seen:  # a symlink cycle, or the same folder reached twice
            return
        seen.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        subdirs = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=True):
                    subdirs.append(entry)
                    continue
            except OSError:
                pass  # a symbolic link loop: not a folder, and listed below if it has an image's name
            if is_image_name(entry.name):
                # broken links, loops and FIFOs too: each is recorded as a failure with its reason
                yield file_item(Path(entry.path))
        if self.recursive:
            for entry in subdirs:
                yield from self._walk(Path(entry.path), seen)


class ImageListSource:
    """``path[,label[,label_2,...]]`` per line; ``#`` comments; paths relative to the list."""

    def __init__(self, list_file: Path):
        self.list_file = list_file
        self.description = f"image-list:{list_file}"

    def __iter__(self) -> Iterator[SourceItem]:
        base = self.list_file.resolve().parent
        owner = str(self.list_file.resolve())  # which list an item came from: ingest --prune asks
        with self.list_file.open(newline="", encoding="utf-8-sig") as f:
            lines = (line for line in f if line.strip() and not line.lstrip().startswith("#"))
            for row in csv.reader(lines, skipinitialspace=True):
                if not row or not row[0].strip():
                    continue
                path = Path(os.path.expanduser(row[0].strip()))
                if not path.is_absolute():
                    path = base / path
                labels = {
                    ("label" if i == 0 else f"label_{i + 1}"): value.strip()
                    for i, value in enumerate(row[1:])
                    if value.strip()
                }
                yield file_item(path, {**labels, "image_list": owner})


class SingleFileSource:
    def __init__(self, path: Path):
        self.path = path
        self.description = str(path)

    def __iter__(self) -> Iterator[SourceItem]:
        yield file_item(self.path)


def select_items(
    items: list[SourceItem], filters: dict[str, Any] | None = None, sample: int | None = None, seed: int = 0
) -> list[SourceItem]:
    """The items whose metadata matches every ``KEY=VALUE`` filter, then, with ``sample``, a
    reproducible random subset of that many: the items whose ids hash lowest under ``seed``.
    Hashing ids (not shuffling positions) keeps a sample stable when the catalog grows."""
    return sample_items(filter_items(items, filters), sample, seed)


def filter_items(items: list[SourceItem], filters: dict[str, Any] | None) -> list[SourceItem]:
    """The items whose metadata passes every filter (``filters.matcher``: ``KEY=VALUE``, any of a
    key's values, and ranges). A key that no item has at all is a mistake, not an empty
    selection: UsageError."""
    if not filters or not items:
        return items
    missing = [key for key in filters if not any(key in it.metadata for it in items)]
    if missing:
        keys = sorted({key for it in items for key in it.metadata})
        raise UsageError(
            f"no item has the metadata key {missing[0]!r} to filter on; their keys: {', '.join(keys)}",
            param="filters",
        )
    test = matcher(filters)
    kept = [it for it in items if test(it.metadata)]
    if not kept:
        raise UsageError(_matches_nothing(items, filters), param="filters")
    return kept


def _matches_nothing(items: list[SourceItem], filters: dict[str, Any]) -> str:
    """Why a filter selects none of ``items``, with the values its key has: a value written in
    another case (``client=small`` for ``Small``) is the usual slip, and it is named."""
    for key, condition in filters.items():
        test = matcher({key: condition})
        if any(test(it.metadata) for it in items):
            continue
        counts: Counter[str] = Counter()
        for it in items:
            value = it.metadata.get(key)
            for v in value if isinstance(value, list) else [value]:
                if v is not None and v != "":
                    counts[str(v)] += 1
        values = [v for v, _ in counts.most_common(12)]
        listed = ", ".join(values) + (f" and {len(counts) - len(values)} more" if len(counts) > len(values) else "")
        message = f"no item matches the filter on {key!r} (of {len(items)}); its values: {listed}"
        wanted = {str(w).casefold() for w in (condition if isinstance(condition, list) else [condition])}
        near = [v for v in counts if v.casefold() in wanted]
        if near:
            message += f" (values match exactly: did you mean {near[0]!r}?)"
        return message
    return f"no item matches all of the filters together (each matches some of the {len(items)} items alone)"


def sample_items(items: list[SourceItem], sample: int | None = None, seed: int = 0) -> list[SourceItem]:
    """With ``sample``, a reproducible random subset of that many items."""
    if sample is not None and sample < len(items):
        rank = {it.id: hashlib.sha1(f"{seed}:{it.id}".encode()).digest() for it in items}
        chosen = set(sorted(rank, key=rank.__getitem__)[:sample])
        items = [it for it in items if it.id in chosen]
    return items
