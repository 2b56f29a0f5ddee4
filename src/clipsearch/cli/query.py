"""``search``, ``similar``, ``embed`` and ``duplicates``: reading a collection by meaning."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from ..choice import ModelChoice
from ..errors import UsageError
from ..settings import DEFAULT_DB, Settings
from ._common import DbOpt, HitsJsonOpt, LimitOpt, NamespaceOpt, err, hooks, out, parse_filters, print_hits

if TYPE_CHECKING:
    import numpy as np

    from ..collection import Collection


def search(
    query: Annotated[str | None, typer.Argument(help="Text to search for.", show_default=False)] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Search by this image instead.")] = None,
    vector: Annotated[
        str | None,
        typer.Option(
            "--vector",
            help="Search by a raw vector instead: a .npy file, or JSON (a list of numbers, an object with "
            "'embedding', or an /v1/embeddings answer); - reads standard input.",
            show_default=False,
        ),
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            envvar="CLIPSEARCH_DB",
            help="SQLite database file, or a postgresql://user:pass@host/db URL (pgvector). Default: "
            "clipsearch.db; with --in, the per-user database $XDG_DATA_HOME/clipsearch/clipsearch.db.",
            show_default=False,
        ),
    ] = None,
    in_: Annotated[
        Path | None,
        typer.Option(
            "--in",
            help="Search the photos under this folder, after bringing them up to date in the database "
            "(new and changed files embedded, deleted ones forgotten).",
            file_okay=False,
            show_default=False,
        ),
    ] = None,
    paths: Annotated[bool, typer.Option("--paths", help="Print only the paths, one a line (for pipes).")] = False,
    namespace: NamespaceOpt = "default",
    limit: LimitOpt = 10,
    filter_: Annotated[
        list[str] | None,
        typer.Option(
            "--filter",
            help="Only items whose metadata KEY=VALUE (repeatable); KEY~=VALUE ignores the case of A-Z; "
            "KEY>=VALUE, <=, >, < for ranges.",
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            envvar="CLIPSEARCH_SEARCH_MODE",
            help="vector (CLIP), keyword (words of item text and metadata, no model), or hybrid (both, fused).",
        ),
    ] = "vector",
    add: Annotated[
        list[str] | None,
        typer.Option("--add", help="Add this text's vector to the query (repeatable; WEIGHT:TEXT, e.g. 2:sunset)."),
    ] = None,
    subtract: Annotated[
        list[str] | None,
        typer.Option("--subtract", help="Subtract this text's vector from the query (repeatable; WEIGHT:TEXT)."),
    ] = None,
    as_json: HitsJsonOpt = False,
    *,
    choice: ModelChoice,
) -> None:
    """Search the store by text (QUERY), by image (--image PATH) or by a raw vector (--vector FILE)."""
    from .. import collection as lib

    if sum(given is not None for given in (query, image, vector)) != 1:
        raise UsageError("give a text QUERY, --image PATH or --vector FILE (exactly one)")
    mode = mode.strip().lower()
    if query is None and mode != "vector":
        raise UsageError(f"--mode {mode} searches by text; search by --image or --vector in vector mode")
    raw = read_vector(vector) if vector is not None else None
    if as_json and paths:
        raise UsageError("give --json or --paths, not both")
    filters = parse_filters(filter_)
    if db is None:
        if in_ is not None:
            Settings.user_db().parent.mkdir(parents=True, exist_ok=True)  # ours to make, unlike a --db folder
            db = str(Settings.user_db())
        else:
            db = DEFAULT_DB
    if in_ is not None:
        if filters and "path" in filters:
            raise UsageError("--in FOLDER is a filter on path: give it or --filter path..., not both")
        from ..filters import under

        filters = {**(filters or {}), **under(in_)}
    with lib.open(
        db, namespace, create=in_ is not None, **_model_kwargs(choice), **hooks(few_calls=True)
    ) as collection:
        if in_ is not None:
            _bring_up_to_date(collection, in_)
        hits = collection.search(
            query,
            image=image,
            vector=raw,
            limit=limit,
            filter=filters,
            mode=mode,
            add=add or (),
            subtract=subtract or (),
        )
    if paths:
        for h in hits:
            sys.stdout.write(f"{h.metadata.get('path') or h.metadata.get('url') or h.id}\n")
        return
    print_hits(hits, as_json)


def read_vector(source: str) -> np.ndarray:
    """``--vector``: one vector from a ``.npy`` file or JSON (a list of numbers, ``{"embedding":
    [...]}``, or the answer of ``/v1/embeddings``), from a file or standard input (``-``)."""
    import io

    import numpy as np

    where = "standard input" if source == "-" else source
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as e:
        raise UsageError(f"--vector {source}: cannot read it ({e.strerror or e})") from None
    if data.startswith(b"\x93NUMPY"):
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as e:
            raise UsageError(f"--vector: {where} is not a readable .npy array ({e})") from None
    else:
        try:
            value = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UsageError(f"--vector: {where} is neither a .npy array nor JSON") from None
        if isinstance(value, dict) and isinstance(value.get("data"), list) and value["data"]:
            value = value["data"][0]  # an /v1/embeddings answer
        if isinstance(value, dict) and "embedding" in value:
            value = value["embedding"]
        if not isinstance(value, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in value
        ):
            raise UsageError(f'--vector: {where} holds no list of numbers (give [0.1, ...] or {{"embedding": [...]}})')
        array = np.asarray(value, dtype=np.float32)
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2 and len(array) == 1:
        array = array[0]
    if array.ndim != 1 or not array.size:
        raise UsageError(f"--vector: {where} holds an array of shape {array.shape}; give one vector")
    if not np.isfinite(array).all():
        raise UsageError(f"--vector: {where} holds a number that is not finite")
    return array


def _bring_up_to_date(collection: Collection, folder: Path) -> None:
    """``search --in``: the folder's files as they are now (an incremental, pruning ingest, which
    reads no file and loads no model when nothing changed), said on stderr only when it did."""
    if not folder.is_dir():
        raise UsageError(f"--in {folder}: no such folder", param="in")
    report = collection.ingest([folder], prune=True, progress=True)
    changes = [
        f"{label} {n}"
        for label, n in (("embedded", report.embedded), ("removed", report.removed), ("moved", report.moved))
        if n
    ]
    if changes:
        err.print(f"updated {folder}: {', '.join(changes)}", highlight=False, markup=False)
    if report.failed:
        err.print(
            f"{report.failed} file(s) under {folder} could not be read; `clipsearch failures` lists them",
            highlight=False,
            markup=False,
        )


def similar(
    item_id: Annotated[str, typer.Argument(metavar="ID", help="The item (e.g. a catalog id).", show_default=False)],
    db: DbOpt = DEFAULT_DB,
    namespace: NamespaceOpt = "default",
    limit: LimitOpt = 10,
    same_filter: Annotated[
        list[str] | None,
        typer.Option("--same-filter", help="Only items with the same value of this metadata key (repeatable)."),
    ] = None,
    as_json: HitsJsonOpt = False,
) -> None:
    """Items nearest to item ID by image vector (the item itself left out). No model needed."""
    from .. import collection as lib

    with lib.open(db, namespace, create=False) as collection:
        print_hits(collection.similar(item_id, limit=limit, same_filter=same_filter), as_json)


def embed(
    text: Annotated[str | None, typer.Option("--text", help="Text to embed.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Image file to embed.")] = None,
    db: DbOpt = DEFAULT_DB,
    namespace: NamespaceOpt = "default",
    *,
    choice: ModelChoice,
) -> None:
    """Print the embedding of a text or an image as a JSON array.

    Uses the namespace's model when the database has one, else --model/--pretrained/--weights.
    """
    from .. import collection as lib
    from ..store import database_exists

    if (text is None) == (image is None):
        raise UsageError("give --text TEXT or --image PATH (exactly one)")
    if database_exists(db):
        with lib.open(db, namespace, **_model_kwargs(choice), **hooks(few_calls=True)) as collection:
            vector = _embed(collection, text, image)
    else:  # no store: the model alone
        from ..store import SQLiteStore

        store = SQLiteStore(":memory:")
        with lib.Collection(store, namespace, choice, **hooks(few_calls=True)) as collection:
            vector = _embed(collection, text, image)
    sys.stdout.write(json.dumps([round(float(x), 8) for x in vector]) + "\n")


def _embed(collection: Collection, text: str | None, image: Path | None):
    if image is not None:
        return collection.embed_images([image])[0]
    return collection.embed_texts([text or ""])[0]


def duplicates(
    db: DbOpt = DEFAULT_DB,
    namespace: NamespaceOpt = "default",
    threshold: Annotated[
        float,
        typer.Option("--threshold", min=0.0, max=1.0, help="Cosine similarity that counts as a duplicate."),
    ] = 0.95,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines, one group each.")] = False,
) -> None:
    """Groups of near-identical images: identical bytes first, then close vectors."""
    from .. import collection as lib

    with lib.open(db, namespace, create=False) as collection:
        groups = collection.duplicates(threshold)
    if as_json:
        for g in groups:
            sys.stdout.write(json.dumps(g.as_dict(), ensure_ascii=False) + "\n")
    elif not groups:
        out.print(f"no duplicates at threshold {threshold}")
    else:
        for i, g in enumerate(groups, 1):
            out.print(
                Text.assemble((f"group {i}", "bold"), f" ({g.kind}, {len(g.items)} items, similarity >= {g.score:.4f})")
            )
            for it in g.items:
                out.print(f"  {it.metadata.get('path', it.id)}", highlight=False, markup=False)


def _model_kwargs(choice: ModelChoice) -> dict:
    """``clipsearch.open``'s model arguments are the fields of ModelChoice."""
    return dataclasses.asdict(choice)
