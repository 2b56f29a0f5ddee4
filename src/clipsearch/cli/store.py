"""``info``, ``failures``, ``export``, ``import``, ``db migrate``, ``index build`` and ``index status``:
the store itself. None of these loads a model or imports torch (``import`` loads one only to
learn the dimensions of a new namespace's model when its files do not record the model)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ..choice import ModelChoice
from ..errors import NoDatabaseError, UsageError, count_failure_kinds, failure_kind
from ..settings import DEFAULT_DB
from ._common import DbOpt, JsonOpt, NamespaceOpt, kinds_text, out, own_id, print_table, short_reason

if TYPE_CHECKING:
    from ..store import IndexStatus


def info(
    db: DbOpt = DEFAULT_DB,
    by: Annotated[
        str | None,
        typer.Option(
            "--by", help="Count the items of --namespace by each value of this metadata key (a catalog column)."
        ),
    ] = None,
    namespace: NamespaceOpt = "default",
    as_json: JsonOpt = False,
) -> None:
    """Per namespace: model, dimensions, items, failures, index kind and freshness, and the
    runtime an ingest would run the model on here, with why; with --by KEY, the items of one
    namespace counted by each value of KEY."""
    from .. import collection as lib

    if by is not None:
        print_counts(db, namespace, by, as_json)
        return
    location, infos = lib.describe(db)
    rows = [i.as_dict() for i in infos]
    if as_json:
        out.print_json(data={"db": location, "namespaces": rows})
        return
    out.print(f"database: {location}", highlight=False)
    table = Table(show_edge=False, pad_edge=False)
    for col in ("namespace", "model", "dim", "items", "failures", "index", "runtime"):
        table.add_column(col)
    for r in rows:
        index = "none" if r["index"] == "none" else f"{r['index']} ({'fresh' if r['index_fresh'] else 'stale'})"
        if r.get("index_tombstones"):
            index += f", {r['index_tombstones']} removed"
        table.add_row(
            r["namespace"], f"{r['backend']} {r['model']}", str(r["dim"]), str(r["items"]), str(r["failures"]), index,
            r["runtime"],
        )  # fmt: skip
    print_table(table)
    for r in rows:  # why, in words the table has no room for
        out.print(f"{r['namespace']}: ingest runs on {r['runtime']}: {r['runtime_reason']}", highlight=False)


def print_counts(db: str, namespace: str, key: str, as_json: bool) -> None:
    from ..collection import Collection
    from ..store import database_exists, open_store

    if not database_exists(db):
        raise NoDatabaseError(db)
    with open_store(db) as store:
        counts = Collection(store, namespace, owns_store=False).count_by(key)
    total = sum(n for _, n in counts)
    if as_json:
        rows = [{"value": value, "items": n} for value, n in counts]
        out.print_json(data={"namespace": namespace, "key": key, "items": total, "counts": rows})
        return
    table = Table(show_edge=False, pad_edge=False)
    for col, justify in ((key, "left"), ("items", "right"), ("share", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for value, n in counts:
        shown = "(no value)" if value is None else value if isinstance(value, str) else json.dumps(value)
        table.add_row(shown, str(n), f"{n / total:.1%}")
    print_table(table)


def failures(
    db: DbOpt = DEFAULT_DB,
    namespace: Annotated[
        str | None,
        typer.Option("--namespace", "-n", envvar="CLIPSEARCH_NAMESPACE", help="Only this namespace."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines, one failure each.")] = False,
) -> None:
    """List the items that failed to ingest, with their reasons."""
    from ..store import database_exists, open_store

    if not database_exists(db):
        raise NoDatabaseError(db)
    with open_store(db) as store:
        rows = store.failures(namespace)
    if as_json:
        for f in rows:
            line = {**dataclasses.asdict(f), "kind": failure_kind(f.reason)}
            sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
    elif not rows:
        out.print("no failures")
    else:
        table = Table(show_edge=False, pad_edge=False)
        for col in ("namespace", "id", "source", "reason", "attempts"):
            table.add_column(col, no_wrap=col in ("source", "reason"))
        for f in rows:
            table.add_row(f.namespace, own_id(f), f.source, short_reason(f.source, f.reason), str(f.attempts))
        print_table(table)
        kinds = count_failure_kinds(f.reason for f in rows)
        out.print(f"{len(rows)} failed; by kind: {kinds_text(kinds)}", highlight=False, markup=False)


def export(
    npy: Annotated[Path | None, typer.Option("--npy", help="npy format: output .npy file, float32 (N, D).")] = None,
    meta: Annotated[
        Path | None, typer.Option("--meta", help="npy format: output JSON, ids and metadata in the same order.")
    ] = None,
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="npy (--npy FILE --meta FILE), or seed-compatible (--out DIR: embeddings.npy, metadata.json, "
            "index.faiss, index_ids.json, manifest.json).",
        ),
    ] = "npy",
    out_dir: Annotated[Path | None, typer.Option("--out", help="seed-compatible format: output folder.")] = None,
    db: DbOpt = DEFAULT_DB,
    namespace: NamespaceOpt = "default",
) -> None:
    """Export a namespace's vectors and metadata."""
    from .. import collection as lib

    if format_ not in ("npy", "seed-compatible"):
        raise UsageError(f"unknown --format {format_!r}; use npy or seed-compatible")
    if format_ == "npy" and (npy is None or meta is None):
        raise UsageError("--format npy needs --npy FILE and --meta FILE")
    if format_ == "seed-compatible" and out_dir is None:
        raise UsageError("--format seed-compatible needs --out DIR")
    with lib.open(db, namespace, create=False) as collection:
        try:
            if format_ == "npy":
                assert npy is not None and meta is not None
                n = collection.export(npy, meta=meta)
                out.print(f"exported {n} vectors to {npy} and metadata to {meta}", highlight=False)
            else:
                assert out_dir is not None
                n = collection.export(out_dir, format="seed-compatible")
                out.print(f"exported {n} vectors with an HNSW index to {out_dir}", highlight=False)
        except UsageError as e:
            if e.param == "out" and format_ == "npy":
                e.param = "npy"  # the library's ``out`` is this command's --npy
            raise


def db_migrate(db: DbOpt = DEFAULT_DB) -> None:
    """Create the schema, or bring it up to this version of clipsearch (every command also does
    this when it opens the store)."""
    from ..store import open_store

    with open_store(db) as store:
        before = getattr(store, "schema_version_before", None)
        now = store.schema_version()
        if before is not None and before != now:
            out.print(f"{store.location}: schema {before or '(none)'} -> {now}", highlight=False)
        else:
            out.print(f"{store.location}: schema {now}, up to date", highlight=False)


def index_build(
    db: DbOpt = DEFAULT_DB,
    namespace: NamespaceOpt = "default",
    kind: Annotated[
        str,
        typer.Option(
            "--kind",
            envvar="CLIPSEARCH_INDEX",
            help="auto (SQLite: by size and CLIPSEARCH_INDEX_MEMORY; PostgreSQL: hnsw), flat, hnsw or ivfpq "
            "(flat and ivfpq: SQLite only). A kind given here is kept by later searches and ingests until an "
            "index build with --kind auto, the default.",
        ),
    ] = "auto",
) -> None:
    """Build (or bring up to date) the namespace's vector index: a file beside SQLite (exact,
    or FAISS's HNSW or IVF-PQ with the faiss extra), an HNSW index (vector_ip_ops) in
    PostgreSQL. On SQLite this also compacts an HNSW index (the vectors of deleted or replaced
    items, skipped by searches until now, leave the graph) and retrains an IVF-PQ index on the
    vectors it holds now. HNSW settings come from CLIPSEARCH_HNSW_M and
    CLIPSEARCH_EF_CONSTRUCTION."""
    from .. import collection as lib
    from ..store import is_postgres_url

    with lib.open(db, namespace, create=False) as collection:
        if is_postgres_url(db) and kind == "auto":
            kind = "hnsw"
        status = collection.build_index(kind)
    print_index_status(namespace, status)


def index_status(db: DbOpt = DEFAULT_DB, namespace: NamespaceOpt = "default", as_json: JsonOpt = False) -> None:
    """The namespace's vector index: its kind and why it was chosen, whether it is fresh, what it
    holds and about how much memory it takes. Reads the index's state file; loads nothing."""
    from .. import collection as lib

    with lib.open(db, namespace, create=False) as collection:
        status = collection.info().index
    if as_json:
        out.print_json(data={"namespace": namespace, **dataclasses.asdict(status)})
        return
    print_index_status(namespace, status)


def print_index_status(namespace: str, status: IndexStatus) -> None:
    from ..index import format_size

    if status.kind == "none":
        out.print(f"{namespace}: no index yet; `clipsearch index build` makes one (a search does too)")
        return
    facts = [f"{status.vectors:,} vectors", "fresh" if status.fresh else "stale (the next search catches it up)"]
    if status.memory:
        facts.append(f"~{format_size(status.memory)} in memory")
    if status.lists:
        facts.append(f"{status.lists:,} lists")
    if status.tombstones:
        facts.append(f"{status.tombstones:,} removed vectors left until `index build`")
    if status.unpurged:
        facts.append(f"{status.unpurged:,} deleted rows whose space `index build` reclaims")
    out.print(f"{namespace}: {status.kind} index, {', '.join(facts)}")
    if status.search:
        out.print(f"  a query: {status.search}")
    if status.reason:
        out.print(f"  why {status.kind}: {status.reason}")
    if status.id_map:
        out.print(f"  id map: {status.id_map:,} ids, read by deletes of 5,000 or more")


def import_(
    npy: Annotated[
        Path,
        typer.Option(
            "--npy",
            help="Vectors: a .npy file (float, N x D), or a folder that `export --format seed-compatible` wrote.",
        ),
    ],
    meta: Annotated[
        Path | None,
        typer.Option(
            "--meta",
            help="Ids and metadata, row for row: what `export` wrote (JSON), a list of objects each with an "
            "id, or JSON Lines (.jsonl). Default: the --npy file with .json.",
        ),
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace/--no-replace", help="Overwrite items already stored under these ids.")
    ] = True,
    db: DbOpt = DEFAULT_DB,
    namespace: NamespaceOpt = "default",
    *,
    choice: ModelChoice,
) -> None:
    """Import vectors computed elsewhere with their ids and metadata: the reverse of `export`.
    They are stored under the model the files record (`export` writes it); files that record none
    take the model options, as ingest does, or the namespace's model. Another model than the
    namespace's, another dimension or a broken row is refused before anything is written."""
    from .. import collection as lib

    with lib.open(db, namespace, **dataclasses.asdict(choice)) as collection:
        n = collection.import_vectors(npy, meta, replace=replace)
        model = collection.identity().model
    out.print(f"imported {n:,} vectors into {namespace} ({model})")
