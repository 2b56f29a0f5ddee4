"""A SOURCE argument as the ``Source`` that reads it: a folder, ``images:DIR``,
``image-list:FILE``, ``catalog:FILE`` or an image file. Above both ``sources`` (folders, lists,
files) and ``catalog`` (product tables), which know nothing of each other's spelling."""

from __future__ import annotations

import os
from pathlib import Path

from .catalog import TABLE_EXTENSIONS, CatalogOptions, CatalogSource
from .errors import UsageError
from .sources import LIST_EXTENSIONS, FolderSource, ImageListSource, SingleFileSource, Source


def parse_source(spec: str, recursive: bool = True, catalog: CatalogOptions | None = None) -> Source:
    """Turn a command-line SOURCE into a Source, or raise a UsageError that says why not."""
    kind, sep, rest = spec.partition(":")
    if sep and kind == "catalog" and rest:
        path = Path(os.path.expanduser(rest))
        if not path.is_file():
            raise UsageError(f"source {spec}: catalog file {path} does not exist")
        return CatalogSource(path, catalog or CatalogOptions())
    if sep and kind in ("images", "image-list") and rest:
        path = Path(os.path.expanduser(rest))
        if kind == "images":
            if not path.is_dir():
                raise UsageError(f"source {spec}: {path} is not a folder")
            return FolderSource(path, recursive)
        if not path.is_file():
            raise UsageError(f"source {spec}: list file {path} does not exist")
        return ImageListSource(path)
    if sep and len(kind) > 1 and not Path(spec).exists():
        raise UsageError(
            f"unknown source kind {kind!r} in {spec!r}; use DIR, images:DIR, image-list:FILE, catalog:FILE "
            "or an image file"
        )
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return FolderSource(path, recursive)
    if path.is_file():
        suffix = "".join(path.suffixes[-1:]).lower()
        if suffix in TABLE_EXTENSIONS:
            raise UsageError(f"source {spec} is a table: use catalog:{spec} for a product catalog")
        if suffix in LIST_EXTENSIONS:
            raise UsageError(f"source {spec} is a text file: use image-list:{spec} for a list of image paths")
        return SingleFileSource(path)
    raise UsageError(f"source {spec}: no such file or folder")
