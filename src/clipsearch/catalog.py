"""Catalog sources: product tables with an id and an image URL (or path) per row.

CSV, TSV, JSON Lines and Parquet (with the ``catalog`` extra, pyarrow), told apart by the file
extension. The id column becomes the item id, so ingesting the catalog again updates items
instead of adding new ones; every other column becomes item metadata, and ``text_columns``
are joined into the item's text (keyword search, and ``--embed-text``).
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MissingExtraError, UsageError, option
from .fetch import is_url
from .sources import SourceItem, fingerprint

TABLE_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
TABLE_EXTENSIONS |= {".parquet": "parquet", ".pq": "parquet"}
IMAGE_COLUMN_GUESSES = ("image_url", "image", "url", "image_path", "path")


@dataclass
class CatalogOptions:
    id_column: str | None = "id"  # None: a row's id is its number in the table (eval's captions)
    image_column: str | None = None  # None: the first of IMAGE_COLUMN_GUESSES the table has
    text_columns: list[str] = field(default_factory=list)
    embed_text: bool = False  # part of the fingerprint: turning it on or off revisits every row


def _jsonable(value: Any) -> Any:
    """A Parquet/JSON cell as a JSON value (dates as ISO text, decimals as numbers)."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value if _text(v))
    return str(value).strip()


class CatalogSource:
    def __init__(self, path: Path, options: CatalogOptions):
        self.path = path
        self.options = options
        self.description = f"catalog:{path}"
        suffix = path.suffix.lower()
        if suffix not in TABLE_EXTENSIONS:
            known = ", ".join(sorted(TABLE_EXTENSIONS))
            raise UsageError(f"catalog {path}: unknown table format {suffix or '(no extension)'!r}; use {known}")
        self.format = TABLE_EXTENSIONS[suffix]
        self.columns = self._columns()
        self.image_column = options.image_column or next((c for c in IMAGE_COLUMN_GUESSES if c in self.columns), "")
        if not self.image_column:
            raise UsageError(
                f"catalog {path} has no image column ({', '.join(IMAGE_COLUMN_GUESSES)}); "
                f"name it with {option('image_column')} (columns: {self._list()})"
            )
        self.require([c for c in (options.id_column, self.image_column, *options.text_columns) if c])

    def _list(self) -> str:
        return ", ".join(self.columns[:30]) + (" ..." if len(self.columns) > 30 else "")

    def require(self, columns: list[str]) -> None:
        """Refuse (before any work) columns the table does not have."""
        named = {self.options.id_column: "id_column", self.image_column: "image_column"}
        for col in columns:
            if col not in self.columns:
                param = named.get(col, "text_columns" if col in self.options.text_columns else "filters")
                raise UsageError(
                    f"catalog {self.path} has no column {col!r} (check {option(param)}); its columns: {self._list()}",
                    param=param,
                )

    # -- reading -----------------------------------------------------------------------
    def _columns(self) -> list[str]:
        try:
            if self.format == "parquet":
                return list(_parquet().ParquetFile(self.path).schema_arrow.names)
            if self.format == "jsonl":
                seen: dict[str, None] = {}
                for _, row in self._rows():
                    seen.update(dict.fromkeys(row))
                return list(seen)
            with self.path.open(newline="", encoding="utf-8-sig") as f:
                return [c.strip() for c in next(csv.reader(f, delimiter=self._delimiter()), [])]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise UsageError(f"cannot read catalog {self.path}: {e}") from None
        except Exception as e:  # pyarrow's errors for a file that is not Parquet
            if type(e).__module__.startswith("pyarrow"):
                raise UsageError(f"cannot read catalog {self.path}: {e}") from None
            raise

    def _delimiter(self) -> str:
        return "\t" if self.format == "tsv" else ","

    def _rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(where the row is, as a person finds it in the file, row): a text file's line
        number (the header is line 1), a Parquet file's data row number."""
        if self.format == "parquet":
            number = 0
            for batch in _parquet().ParquetFile(self.path).iter_batches(batch_size=10_000):
                for row in batch.to_pylist():
                    number += 1
                    yield f"data row {number}", {k: _jsonable(v) for k, v in row.items()}
        elif self.format == "jsonl":
            with self.path.open(encoding="utf-8-sig") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UsageError(f"catalog {self.path}, line {lineno}: not JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise UsageError(f"catalog {self.path}, line {lineno}: expected a JSON object per line")
                    yield f"line {lineno}", {str(k): _jsonable(v) for k, v in row.items()}
        else:
            with self.path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, delimiter=self._delimiter(), skipinitialspace=True)
                reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
                ended = reader.line_num
                for row in reader:
                    # a quoted field may span lines: a row starts on the line after the last one
                    start, ended = ended + 1, reader.line_num
                    row = {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k is not None}
                    yield f"line {start}", row

    def __iter__(self) -> Iterator[SourceItem]:
        options = self.options
        base = self.path.resolve().parent
        try:
            for number, (where, row) in enumerate(self._rows(), 1):
                yield self._item(row, number, where, base, options)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise UsageError(f"cannot read catalog {self.path}: {e}") from None

    def _item(self, row: dict[str, Any], number: int, where: str, base: Path, options: CatalogOptions) -> SourceItem:
        raw_id = _text(row.get(options.id_column)) if options.id_column else f"{self.path.name}#{number}"
        ref = _text(row.get(self.image_column))
        text = " ".join(t for t in (_text(row.get(c)) for c in options.text_columns) if t) or None
        metadata: dict[str, Any] = dict(row)
        metadata.setdefault("type", "image")  # a product's own "type" column wins
        metadata.setdefault("catalog", self.path.name)
        metadata["catalog_path"] = str(self.path.resolve())  # which file a row came from: ingest --prune asks
        fp = fingerprint(ref, row, text, options.embed_text)
        item = SourceItem(id=raw_id, source=ref, path=None, metadata=metadata, text=text, fingerprint=fp)
        if not raw_id:
            item.id = f"{self.path.name}#row{number}"
            item.source = item.source or item.id
            item.error = f"{where} has no {options.id_column}"
        elif not ref:
            item.source = f"{self.path.name}#{raw_id}"
            item.error = f"{where} has no {self.image_column}"
        elif is_url(ref):
            item.url = ref
            metadata["url"] = ref
        else:
            path = Path(os.path.expanduser(ref))
            path = path if path.is_absolute() else base / path
            item.path = path
            item.source = str(path)
            metadata["path"] = str(path)
            try:
                st = path.stat()
                item.size, item.mtime_ns = st.st_size, st.st_mtime_ns
            except OSError:
                pass  # the decode stage records why it cannot be read
        return item


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError("reading Parquet catalogs (pyarrow)", "catalog") from None
    return pq
