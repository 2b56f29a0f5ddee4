"""The embedding worker: keeps the vector column of an application's own PostgreSQL table filled.

A row is pending when its vector is NULL, when its status is ``pending``, and, if asked, when
its vector is all zeros (``--requeue-zero``) or was made by another model
(``--requeue-model-mismatch``): the repairs teams otherwise do by hand in SQL. A row marked
failed (its status column says ``failed``; without one, its error column is set) stays out of
all of them unless ``--retry-failed``.

Each batch is claimed with ``SELECT ... FOR UPDATE SKIP LOCKED`` inside one transaction, embedded,
written and committed, so any number of workers can run on one table and no row is done twice;
a worker that dies mid-batch leaves its rows untouched for the next one. ``--watch`` keeps
polling, woken early by ``LISTEN``/``NOTIFY`` once ``clipsearch worker install-trigger`` has
added the trigger. A stop request (SIGTERM, Ctrl-C) lets the batch in hand finish first.
"""

from __future__ import annotations

import re
import string
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .decode_stage import DecodeSettings, decode_crop, failure_reason
from .download_cache import DownloadCache, Downloaded, DownloadSettings, download_all
from .errors import ClipsearchError, UsageError, option
from .fetch import is_url
from .filters import filter_folded, filter_ranges, filter_values
from .imaging import DEFAULT_MAX_MEGAPIXELS
from .store.postgres import load_psycopg, redact

if TYPE_CHECKING:
    from .encoders import Encoder


@dataclass
class WorkerOptions:
    table: str
    id_column: str
    vector_column: str
    image_column: str | None = None
    text_column: str | None = None
    status_column: str | None = None
    error_column: str | None = None
    model_column: str | None = None
    model_version: str | None = None  # default: the encoder's model id
    batch_size: int = 32
    watch: bool = False
    poll_interval: float = 5.0
    requeue_zero: bool = False
    requeue_model_mismatch: bool = False
    retry_failed: bool = False
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    cache_dir: Path | None = None
    download: DownloadSettings = field(default_factory=DownloadSettings)
    limit: int | None = None  # rows this run (embedded or failed)
    # only rows whose columns pass these (clipsearch.filters' grammar, on the table's own columns)
    filters: dict[str, Any] = field(default_factory=dict)


# PostgreSQL's number types, as format_type names them: a range filter compares these numerically
_NUMERIC_TYPE = re.compile(r"^(smallint|integer|bigint|real|double precision|numeric(\(.*\))?)$")


def _as_sql_text(value: Any) -> str:
    """A filter value as PostgreSQL writes the column's value as text (``true``, ``500``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass
class WorkerReport:
    embedded: int = 0
    failed: int = 0
    batches: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (row id, reason)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON data (``worker --json``)."""
        data = asdict(self)
        data["seconds"] = round(self.seconds, 3)
        data["failures"] = [{"id": i, "reason": r} for i, r in self.failures]
        return data


def model_version(encoder: Encoder) -> str:
    identity = encoder.identity
    return identity.model_id + ("" if identity.quantization == "none" else f"+{identity.quantization}")


def channel_name(table: str) -> str:
    """The NOTIFY channel of a table: ``clipsearch_<table>``, as a plain identifier."""
    return ("clipsearch_" + re.sub(r"[^a-z0-9_]", "_", table.lower()))[:63]


class Worker:
    def __init__(self, url: str, encoder: Encoder, options: WorkerOptions):
        psycopg, _, register_vector = load_psycopg()
        self.psycopg = psycopg
        self.sql = psycopg.sql
        self.encoder = encoder
        self.options = options
        self.location = redact(url)
        if (options.image_column is None) == (options.text_column is None):
            raise UsageError(
                f"give {option('image_column')} (embed images) or {option('text_column')} (embed texts), exactly one"
            )
        self.version = options.model_version or model_version(encoder)
        self.url = url
        try:
            self.conn = psycopg.connect(url, connect_timeout=10)
        except psycopg.OperationalError as e:
            raise UsageError(f"cannot connect to {self.location}: {str(e).strip().splitlines()[0]}") from None
        try:
            register_vector(self.conn)
        except psycopg.ProgrammingError:
            raise UsageError(f"{self.location} has no vector extension (CREATE EXTENSION vector)") from None
        self.conn.commit()
        self.columns = self._check_table()
        self._failed_here: set[str] = set()  # rows that failed in this process
        self._cache: DownloadCache | None = None

    # -- checks ------------------------------------------------------------------------
    def _table_ident(self) -> Any:
        return self.sql.Identifier(*self.options.table.split(".", 1))

    def _check_table(self) -> dict[str, str]:
        """Column name -> type, after checking that every named column exists and that the
        vector column is a vector of the model's dimension (before anything is written)."""
        o = self.options
        try:
            rows = self.conn.execute(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                (o.table,),
            ).fetchall()
        except self.psycopg.errors.UndefinedTable:
            self.conn.rollback()
            raise UsageError(f"table {o.table!r} does not exist in {self.location}") from None
        self.conn.commit()
        columns = {name: kind for name, kind in rows}
        named = {
            "id_column": o.id_column,
            "vector_column": o.vector_column,
            "image_column": o.image_column,
            "text_column": o.text_column,
            "status_column": o.status_column,
            "error_column": o.error_column,
            "model_column": o.model_column,
        }
        for param, column in named.items():
            if column is not None and column not in columns:
                raise UsageError(
                    f"table {o.table!r} has no column {column!r}; its columns: {', '.join(columns)}", param=param
                )
        kind = columns[o.vector_column]
        match = re.fullmatch(r"vector(?:\((\d+)\))?", kind)
        if match is None:
            raise UsageError(f"column {o.vector_column!r} is {kind}, not a pgvector vector")
        if match.group(1) and int(match.group(1)) != self.encoder.dim:
            raise UsageError(
                f"column {o.vector_column!r} is {kind}, but {self.encoder.model_id} makes "
                f"{self.encoder.dim}-d vectors; use a matching model or column"
            )
        return columns

    # -- the queue ---------------------------------------------------------------------
    def _pending(self) -> tuple[Any, dict[str, Any]]:
        """The SQL condition of a pending row, and its parameters."""
        o, sql = self.options, self.sql
        vector = sql.Identifier(o.vector_column)
        conditions = []
        params: dict[str, Any] = {"version": self.version, "failed_here": list(self._failed_here)}
        # a row marked failed (its status, else its error column) stays out of every repair
        # unless retry_failed: a NULL vector, a zero one or another model's alike
        if o.retry_failed:
            not_failed = sql.SQL("TRUE")
        elif o.status_column:
            not_failed = sql.SQL("{s} IS DISTINCT FROM 'failed'").format(s=sql.Identifier(o.status_column))
        elif o.error_column:
            not_failed = sql.SQL("{e} IS NULL").format(e=sql.Identifier(o.error_column))
        else:
            not_failed = sql.SQL("TRUE")  # nothing marks a failure: only this process remembers
        if o.status_column:
            status = sql.Identifier(o.status_column)
            conditions.append(sql.SQL("{s} = 'pending'").format(s=status))
            if o.retry_failed:
                conditions.append(sql.SQL("{s} = 'failed'").format(s=status))
        conditions.append(sql.SQL("({v} IS NULL AND {ok})").format(v=vector, ok=not_failed))
        if o.requeue_zero:
            conditions.append(sql.SQL("(vector_norm({v}) = 0 AND {ok})").format(v=vector, ok=not_failed))
        if o.requeue_model_mismatch:
            if not o.model_column:
                raise UsageError(f"{option('requeue_model_mismatch')} needs {option('model_column')}")
            conditions.append(
                sql.SQL("({v} IS NOT NULL AND {m} IS DISTINCT FROM %(version)s AND {ok})").format(
                    v=vector, m=sql.Identifier(o.model_column), ok=not_failed
                )
            )
        condition = sql.SQL("({})").format(sql.SQL(" OR ").join(conditions))
        if o.filters:
            condition = sql.SQL("{} AND {}").format(condition, self._row_filter(params))
        # a row that failed in this process is not tried again by it (--retry-failed and rows
        # without a status column would otherwise come straight back)
        condition = sql.SQL("{} AND NOT ({}::text = ANY(%(failed_here)s))").format(
            condition, sql.Identifier(o.id_column)
        )
        return condition, params

    def _row_filter(self, params: dict[str, Any]) -> Any:
        """``--filter`` as SQL on the table's own columns, its values as parameters: equality
        compares the column's text (``500`` matches an integer 500, ``true`` a boolean), ranges
        compare numbers on numeric columns and text in code-point order on the others, ``~=``
        folds A-Z as everywhere else (``clipsearch.filters``)."""
        sql = self.sql
        filters = self.options.filters
        values, ranges, folded = filter_values(filters), filter_ranges(filters), filter_folded(filters)
        for key in [k for k, _ in values] + [r.key for r in ranges] + [k for k, _ in folded]:
            if key not in self.columns:
                raise UsageError(
                    f"{option('filters')} {key}: table {self.options.table!r} has no such column; its columns: "
                    f"{', '.join(self.columns)}",
                    param="filters",
                )
        parts = []
        for i, (key, wanted) in enumerate(values):
            params[f"fv{i}"] = sorted({_as_sql_text(v) for v in wanted})
            parts.append(sql.SQL("{c}::text = ANY(%(fv{i})s)").format(c=sql.Identifier(key), i=sql.SQL(str(i))))
        for i, r in enumerate(ranges):
            numeric = _NUMERIC_TYPE.match(self.columns[r.key]) is not None
            if numeric and r.number is None:
                raise UsageError(
                    f"{option('filters')} {r.key} {r.sql} needs a number: {r.key} is {self.columns[r.key]}"
                )
            params[f"fr{i}"] = r.number if numeric else r.text
            column = sql.Identifier(r.key) if numeric else sql.SQL("{}::text").format(sql.Identifier(r.key))
            parts.append(sql.SQL("{c} " + r.sql + " %(fr{i})s").format(c=column, i=sql.SQL(str(i))))
        if folded:
            params["upper"], params["lower"] = string.ascii_uppercase, string.ascii_lowercase
        for i, (key, texts) in enumerate(folded):
            params[f"ff{i}"] = texts
            parts.append(
                sql.SQL("translate({c}::text, %(upper)s, %(lower)s) = ANY(%(ff{i})s)").format(
                    c=sql.Identifier(key), i=sql.SQL(str(i))
                )
            )
        return sql.SQL("({})").format(sql.SQL(" AND ").join(parts))

    def pending_count(self) -> int:
        condition, params = self._pending()
        query = self.sql.SQL("SELECT count(*) FROM {t} WHERE {c}").format(t=self._table_ident(), c=condition)
        count = self.conn.execute(query, params).fetchone()[0]
        self.conn.commit()
        return int(count)

    def run(self, stop: threading.Event | None = None, on_batch: Any = None) -> WorkerReport:
        stop = stop or threading.Event()
        report = WorkerReport()
        started = time.perf_counter()
        listener = self._listen() if self.options.watch else None
        try:
            while not stop.is_set() and not self._limit_reached(report):
                done = self._one_batch(report)
                if done and on_batch:
                    on_batch(report)
                if done:
                    continue
                if not self.options.watch:
                    break
                self._wait(listener, stop)
        finally:
            if listener is not None:
                listener.close()
            if self._cache is not None:
                self._cache.close()
        report.seconds = time.perf_counter() - started
        return report

    def _limit_reached(self, report: WorkerReport) -> bool:
        return self.options.limit is not None and report.embedded + report.failed >= self.options.limit

    def _listen(self) -> Any:
        conn = self.psycopg.connect(self.url, autocommit=True)
        conn.execute(self.sql.SQL("LISTEN {}").format(self.sql.Identifier(channel_name(self.options.table))))
        return conn

    def _wait(self, listener: Any, stop: threading.Event) -> None:
        """Until a NOTIFY arrives, the poll interval passes, or a stop is asked for."""
        deadline = time.monotonic() + self.options.poll_interval
        while not stop.is_set() and time.monotonic() < deadline:
            # short waits, so that a stop request is seen within half a second
            timeout = min(0.5, max(0.0, deadline - time.monotonic()))
            if any(True for _ in listener.notifies(timeout=timeout, stop_after=1)):
                return

    def _one_batch(self, report: WorkerReport) -> int:
        """Claim, embed and write one batch in one transaction; the number of rows it took."""
        o, sql = self.options, self.sql
        source = o.image_column or o.text_column
        assert source is not None
        condition, params = self._pending()
        query = sql.SQL("SELECT {id}::text, {id}, {src} FROM {t} WHERE {c} LIMIT %(n)s FOR UPDATE SKIP LOCKED").format(
            id=sql.Identifier(o.id_column), src=sql.Identifier(source), t=self._table_ident(), c=condition
        )
        with self.conn.transaction():
            room = o.batch_size if o.limit is None else min(o.batch_size, o.limit - report.embedded - report.failed)
            rows = self.conn.execute(query, {**params, "n": room}).fetchall()
            if not rows:
                return 0
            if o.image_column:
                vectors, errors = self._embed_images([r[2] for r in rows])
            else:
                vectors, errors = self._embed_texts([r[2] for r in rows])
            for (key, row_id, _), vector, error in zip(rows, vectors, errors, strict=True):
                if error is None:
                    self._write(row_id, vector)
                    report.embedded += 1
                else:
                    self._write_failure(row_id, error)
                    self._failed_here.add(key)
                    report.failed += 1
                    report.failures.append((key, error))
        report.batches += 1
        return len(rows)

    def _set(self, assignments: list[tuple[str, Any]]) -> tuple[Any, list[Any]]:
        sql = self.sql
        parts = [sql.SQL("{} = %s").format(sql.Identifier(column)) for column, _ in assignments]
        if "updated_at" in self.columns:
            parts.append(sql.SQL("updated_at = now()"))
        return sql.SQL(", ").join(parts), [value for _, value in assignments]

    def _write(self, row_id: Any, vector: np.ndarray) -> None:
        o = self.options
        assignments: list[tuple[str, Any]] = [(o.vector_column, vector)]
        if o.status_column:
            assignments.append((o.status_column, "done"))
        if o.model_column:
            assignments.append((o.model_column, self.version))
        if o.error_column:
            assignments.append((o.error_column, None))
        self._update(row_id, assignments)

    def _write_failure(self, row_id: Any, reason: str) -> None:
        o = self.options
        assignments: list[tuple[str, Any]] = []
        if o.status_column:
            assignments.append((o.status_column, "failed"))
        if o.error_column:
            assignments.append((o.error_column, reason))
        if assignments:
            self._update(row_id, assignments)

    def _update(self, row_id: Any, assignments: list[tuple[str, Any]]) -> None:
        sets, values = self._set(assignments)
        query = self.sql.SQL("UPDATE {t} SET {s} WHERE {id} = %s").format(
            t=self._table_ident(), s=sets, id=self.sql.Identifier(self.options.id_column)
        )
        self.conn.execute(query, [*values, row_id])

    # -- embedding ---------------------------------------------------------------------
    def _embed_texts(self, values: list[Any]) -> tuple[list[np.ndarray | None], list[str | None]]:
        texts = [str(v).strip() if v is not None else "" for v in values]
        errors: list[str | None] = [None if t else f"empty {self.options.text_column}" for t in texts]
        good = [i for i, t in enumerate(texts) if t]
        vectors: list[np.ndarray | None] = [None] * len(texts)
        if good:
            for i, vector in zip(good, self.encoder.embed_texts([texts[i] for i in good]), strict=True):
                vectors[i] = vector
        return vectors, errors

    def _embed_images(self, refs: list[Any]) -> tuple[list[np.ndarray | None], list[str | None]]:
        data: list[bytes | None] = [None] * len(refs)
        errors: list[str | None] = [None] * len(refs)
        urls: list[int] = []
        for i, ref in enumerate(refs):
            ref = str(ref).strip() if ref is not None else ""
            if not ref:
                errors[i] = f"empty {self.options.image_column}"
            elif is_url(ref):
                urls.append(i)
            else:
                try:
                    data[i] = Path(ref).read_bytes()
                except OSError as e:
                    errors[i] = f"cannot read {ref}: {e.strerror or e}"
        if urls:
            for i, result in zip(urls, self._download([str(refs[i]).strip() for i in urls]), strict=True):
                if result.path is not None:
                    data[i] = result.path.read_bytes()
                else:
                    errors[i] = result.error
        crops, index = [], []
        settings = DecodeSettings.for_encoder(self.encoder, self.options.max_megapixels)
        for i, blob in enumerate(data):
            if blob is None:
                continue
            try:
                crops.append(decode_crop(blob, settings)[1])
            except Exception as e:  # one bad image must never stop the batch
                errors[i] = failure_reason(e)
                continue
            index.append(i)
        vectors: list[np.ndarray | None] = [None] * len(refs)
        if crops:
            for i, vector in zip(index, self.encoder.embed_crops(np.stack(crops)), strict=True):
                vectors[i] = vector
        return vectors, errors

    def _download(self, urls: list[str]) -> list[Downloaded]:
        if self._cache is None:
            from .pipeline import default_cache_dir

            self._cache = DownloadCache(self.options.cache_dir or default_cache_dir(self.url))
        return download_all(self._cache, urls, self.options.download, retry_failed=self.options.retry_failed)

    def close(self) -> None:
        self.conn.close()


def install_trigger(
    url: str, table: str, source_column: str, vector_column: str, status_column: str | None = None
) -> str:
    """A trigger that NOTIFYs ``channel_name(table)`` when rows are added or their source
    changes, and that clears the vector (status ``pending``) of a row whose source changed."""
    psycopg, _, _ = load_psycopg()
    sql = psycopg.sql
    channel = channel_name(table)
    function = sql.Identifier(channel + "_fn")
    parts = table.split(".", 1)
    reset = sql.SQL("NEW.{v} := NULL;").format(v=sql.Identifier(vector_column))
    if status_column:
        reset = sql.SQL("{} NEW.{} := 'pending';").format(reset, sql.Identifier(status_column))
    statements = [
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF TG_OP = 'UPDATE' AND TG_WHEN = 'BEFORE' THEN "
            "IF NEW.{src} IS DISTINCT FROM OLD.{src} THEN {reset} END IF; RETURN NEW; END IF; "
            "PERFORM pg_notify({ch}, ''); RETURN NULL; END $$"
        ).format(f=function, src=sql.Identifier(source_column), reset=reset, ch=sql.Literal(channel)),
        sql.SQL("DROP TRIGGER IF EXISTS clipsearch_reset ON {t}").format(t=sql.Identifier(*parts)),
        sql.SQL(
            "CREATE TRIGGER clipsearch_reset BEFORE UPDATE OF {src} ON {t} FOR EACH ROW EXECUTE FUNCTION {f}()"
        ).format(src=sql.Identifier(source_column), t=sql.Identifier(*parts), f=function),
        sql.SQL("DROP TRIGGER IF EXISTS clipsearch_notify ON {t}").format(t=sql.Identifier(*parts)),
        sql.SQL(
            "CREATE TRIGGER clipsearch_notify AFTER INSERT OR UPDATE OF {cols} ON {t} "
            "FOR EACH STATEMENT EXECUTE FUNCTION {f}()"
        ).format(
            cols=sql.SQL(", ").join(
                sql.Identifier(c) for c in [source_column, *([status_column] if status_column else [])]
            ),
            t=sql.Identifier(*parts),
            f=function,
        ),
    ]
    try:
        with psycopg.connect(url, connect_timeout=10) as conn, conn.transaction():
            for statement in statements:
                conn.execute(statement)
    except psycopg.errors.UndefinedTable:
        raise UsageError(f"table {table!r} does not exist in {redact(url)}") from None
    except psycopg.errors.UndefinedColumn as e:
        raise UsageError(f"table {table!r}: {str(e).strip().splitlines()[0]}") from None
    except psycopg.OperationalError as e:
        raise ClipsearchError(f"cannot connect to {redact(url)}: {str(e).strip().splitlines()[0]}") from None
    return channel
