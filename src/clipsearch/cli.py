"""The ``clipsearch`` command line: ingest, search, similar, embed, duplicates, export, info,
failures, serve.

Settings come from flags, then ``CLIPSEARCH_*`` environment variables, then the model recorded
for the namespace (so ``search`` uses whatever ``ingest`` used), then the defaults.
Exit codes: 0 success, 1 some items failed, 2 a usage or set-up error, 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from . import __version__
from .errors import ClipsearchError, UsageError

app = typer.Typer(
    name="clipsearch",
    help="Self-hosted CLIP embeddings and semantic image search.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

# -- shared options ------------------------------------------------------------------------
DbOpt = Annotated[
    str,
    typer.Option(
        "--db",
        envvar="CLIPSEARCH_DB",
        help="SQLite database file, or a postgresql://user:pass@host/db URL (pgvector).",
        show_default=True,
    ),
]
NamespaceOpt = Annotated[
    str,
    typer.Option("--namespace", "-n", envvar="CLIPSEARCH_NAMESPACE", help="Namespace inside the store."),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        envvar="CLIPSEARCH_MODEL",
        help="open_clip architecture (ViT-B-32, ViT-B-16, ViT-L-14, ...), hf-hub:ORG/REPO, or hf:REPO for "
        "transformers. Default: the namespace's model, else ViT-B-32.",
    ),
]
PretrainedOpt = Annotated[
    str | None,
    typer.Option("--pretrained", envvar="CLIPSEARCH_PRETRAINED", help="open_clip pretrained tag (default: openai)."),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        envvar="CLIPSEARCH_WEIGHTS",
        help="Local weights: a checkpoint file, or a saved model folder (open_clip or transformers).",
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option("--device", envvar="CLIPSEARCH_DEVICE", help="auto, cpu, cuda, cuda:N or mps."),
]
RuntimeOpt = Annotated[
    str | None,
    typer.Option(
        "--runtime",
        envvar="CLIPSEARCH_RUNTIME",
        help="torch, or onnx (ONNX Runtime on the CPU; towers exported once to a cache). Default: the "
        "namespace's, else torch.",
    ),
]
PrecisionOpt = Annotated[
    str | None,
    typer.Option(
        "--precision",
        envvar="CLIPSEARCH_PRECISION",
        help="fp32, or int8 (ONNX Runtime dynamic quantisation; a separate model identity). fp16 is automatic on CUDA.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON).")]
_CAT = "Catalogs and selection"


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("open_clip").setLevel(logging.ERROR)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tf_logging

        tf_logging.set_verbosity_error()
    except ImportError:
        pass


def handle_errors(fn: F) -> F:
    """Turn user-facing errors into one ``error:`` line and their exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ClipsearchError as e:
            err.print(f"[bold red]error:[/] {e.message}", highlight=False, markup=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        out.print(f"clipsearch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    _quiet_libraries()


# -- helpers -------------------------------------------------------------------------------
def _open(db: str, must_exist: bool = False):
    from .store import open_store

    if must_exist and "://" not in db and not Path(db).exists():
        raise UsageError(f"no database at {db}; run `clipsearch ingest` first or pass --db")
    return open_store(db)


def _model_spec(
    model: str | None,
    pretrained: str | None,
    weights: Path | None,
    device: str,
    recorded: dict | None,
    runtime: str | None = None,
    precision: str | None = None,
):
    """Flags first, then the namespace's recorded model, then the defaults. Runtime and precision
    are execution choices: given alone, they apply to the recorded model."""
    import dataclasses

    from .encoders import DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelSpec

    if model is None and pretrained is None and weights is None and recorded:
        spec = ModelSpec.from_dict(recorded, device)
    else:
        spec = ModelSpec(
            model=model or DEFAULT_MODEL,
            pretrained=pretrained if pretrained is not None else DEFAULT_PRETRAINED,
            weights=weights,
            device=device,
        )
    if runtime is not None:
        spec = dataclasses.replace(spec, runtime=runtime.strip().lower())
    if precision is not None:
        spec = dataclasses.replace(spec, precision=precision.strip().lower())
    return spec


def _load_encoder(spec):
    from .encoders import load_encoder

    with err.status(f"loading {spec.model} ...", spinner="dots") if err.is_terminal else _nullcontext():
        return load_encoder(spec)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _encoder_for_namespace(store, namespace, model, pretrained, weights, device, runtime=None, precision=None):
    """The encoder to query ``namespace`` with: its recorded model unless told otherwise, and
    never one that would mix vector spaces."""
    from .store import check_same_model

    info = store.namespace(namespace)
    if info is None:
        raise UsageError(f"namespace {namespace!r} does not exist in {store.location}; run `clipsearch ingest` first")
    spec = _model_spec(model, pretrained, weights, device, info.model_spec, runtime, precision)
    encoder = _load_encoder(spec)
    check_same_model(namespace, info.identity, encoder.identity)
    return encoder


def _query_image(encoder, path: Path):
    """Decode a query image exactly as ingest decodes stored ones (same DCT-scaled path), so a
    stored file searched by itself scores 1.0."""
    from .imaging import decode_file

    return decode_file(path, draft_size=encoder.preprocess_spec.draft_size).image


def _parse_filters(values: list[str] | None) -> dict[str, Any] | None:
    if not values:
        return None
    filters: dict[str, list[str]] = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise UsageError(f"bad --filter {v!r}: use KEY=VALUE, e.g. --filter label=cat")
        filters.setdefault(key.strip(), []).append(value.strip())
    return filters


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:6.1f} items/s" if speed else "    -- items/s", style="progress.data.speed")


# -- commands ------------------------------------------------------------------------------
@app.command()
@handle_errors
def ingest(
    sources: Annotated[
        list[str],
        typer.Argument(help="DIR, images:DIR, image-list:FILE, or an image file.", show_default=False),
    ],
    db: DbOpt = "clipsearch.db",
    namespace: NamespaceOpt = "default",
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    runtime: RuntimeOpt = None,
    precision: PrecisionOpt = None,
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", min=1, envvar="CLIPSEARCH_BATCH_SIZE", help="Images per model call."),
    ] = 32,
    limit: Annotated[int | None, typer.Option("--limit", min=0, help="Embed at most N new items.")] = None,
    recursive: Annotated[bool, typer.Option("--recursive/--no-recursive", help="Descend into subfolders.")] = True,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            envvar="CLIPSEARCH_WORKERS",
            help="Decode workers (default: threads, one per core up to 4; processes, cores - 1).",
        ),
    ] = None,
    worker_type: Annotated[
        str,
        typer.Option(
            "--worker-type",
            envvar="CLIPSEARCH_WORKER_TYPE",
            help="thread, process, or auto: threads when the model runs on the CPU, processes with a GPU.",
        ),
    ] = "auto",
    max_megapixels: Annotated[
        float,
        typer.Option(
            "--max-megapixels", envvar="CLIPSEARCH_MAX_MEGAPIXELS", help="Refuse larger images (0: no limit)."
        ),
    ] = 50.0,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Try items that failed in earlier runs again.")
    ] = False,
    filter_: Annotated[
        list[str] | None,
        typer.Option("--filter", help="Only items (catalog rows) whose KEY=VALUE (repeatable).", rich_help_panel=_CAT),
    ] = None,
    sample: Annotated[
        int | None,
        typer.Option("--sample", min=0, help="A reproducible random sample of N items.", rich_help_panel=_CAT),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Which sample --sample takes.", rich_help_panel=_CAT)] = 0,
    id_column: Annotated[
        str, typer.Option("--id-column", help="Catalog column with the item id.", rich_help_panel=_CAT)
    ] = "id",
    image_column: Annotated[
        str | None,
        typer.Option(
            "--image-column",
            help="Catalog column with the image URL or path (default: image_url, image, url, image_path or path).",
            rich_help_panel=_CAT,
        ),
    ] = None,
    text_columns: Annotated[
        str | None,
        typer.Option(
            "--text-columns",
            help="Comma-separated catalog columns that make the item's text (keyword search, --embed-text).",
            rich_help_panel=_CAT,
        ),
    ] = None,
    embed_text: Annotated[
        bool,
        typer.Option(
            "--embed-text", help="Also store the text tower's vector of the item's text.", rich_help_panel=_CAT
        ),
    ] = False,
    download_missing: Annotated[
        bool,
        typer.Option(
            "--download-missing/--offline",
            envvar="CLIPSEARCH_DOWNLOAD",
            help="Download image URLs not in the cache, or use the cache only (the rest fail as 'not cached').",
            rich_help_panel=_CAT,
        ),
    ] = True,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            envvar="CLIPSEARCH_CACHE_DIR",
            help="Download cache (default: DB-cache beside the database).",
            rich_help_panel=_CAT,
        ),
    ] = None,
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency", min=1, envvar="CLIPSEARCH_CONCURRENCY", help="Downloads at once.", rich_help_panel=_CAT
        ),
    ] = 16,
    download_timeout: Annotated[
        float,
        typer.Option(
            "--download-timeout",
            min=0.1,
            envvar="CLIPSEARCH_DOWNLOAD_TIMEOUT",
            help="Seconds per download attempt.",
            rich_help_panel=_CAT,
        ),
    ] = 30.0,
    retries: Annotated[
        int,
        typer.Option(
            "--retries",
            min=0,
            envvar="CLIPSEARCH_RETRIES",
            help="Retries of a download after a timeout, a broken connection, 5xx or 429 (with backoff).",
            rich_help_panel=_CAT,
        ),
    ] = 3,
    max_download_mb: Annotated[
        float,
        typer.Option(
            "--max-download-mb",
            min=0.001,
            envvar="CLIPSEARCH_MAX_DOWNLOAD_MB",
            help="Refuse larger downloads.",
            rich_help_panel=_CAT,
        ),
    ] = 50.0,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray",
            envvar="CLIPSEARCH_RAY",
            help="Run on a Ray cluster: local (a cluster for this run; also ''), auto, or ray://HOST:10001.",
            rich_help_panel="Ray",
        ),
    ] = None,
    actors: Annotated[
        int, typer.Option("--actors", min=1, help="Ray: encoder actors (model copies).", rich_help_panel="Ray")
    ] = 1,
    gpus_per_actor: Annotated[
        float, typer.Option("--gpus-per-actor", min=0.0, help="Ray: GPUs per encoder actor.", rich_help_panel="Ray")
    ] = 0.0,
    cpus_per_actor: Annotated[
        float,
        typer.Option(
            "--cpus-per-actor", min=0.1, help="Ray: CPUs (and threads) per encoder actor.", rich_help_panel="Ray"
        ),
    ] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Embed images from folders, image lists and catalogs into the store (resumable, incremental)."""
    import dataclasses

    from .catalog import CatalogOptions, CatalogSource
    from .downloads import CATALOG_POLICY, DownloadSettings
    from .pipeline import IngestOptions, Ingestor, default_cache_dir, resolve_worker_type
    from .sources import parse_source
    from .store import validate_namespace

    validate_namespace(namespace)
    resolve_worker_type(worker_type, "cpu")  # a typo fails before the model loads
    filters = _parse_filters(filter_)
    columns = [c.strip() for c in (text_columns or "").split(",") if c.strip()]
    if embed_text and not columns:
        raise UsageError("--embed-text needs --text-columns: the catalog columns to embed")
    catalog = CatalogOptions(id_column, image_column, columns, embed_text)
    parsed = [parse_source(s, recursive=recursive, catalog=catalog) for s in sources]
    for source in parsed:
        if isinstance(source, CatalogSource) and filters:
            source.require(list(filters))
    store = _open(db)
    info = store.namespace(namespace)
    spec = _model_spec(model, pretrained, weights, device, info.model_spec if info else None, runtime, precision)
    encoder = _load_encoder(spec)
    options = IngestOptions(
        namespace=namespace,
        batch_size=batch_size,
        limit=limit,
        workers=workers,
        worker_type=worker_type,
        retry_failed=retry_failed,
        max_megapixels=max_megapixels,
        filters=filters,
        sample=sample,
        seed=seed,
        embed_text=embed_text,
        offline=not download_missing,
        cache_dir=cache_dir or default_cache_dir(db),
        download=DownloadSettings(
            concurrency=concurrency,
            retries=retries,
            policy=dataclasses.replace(
                CATALOG_POLICY, timeout=download_timeout, max_bytes=int(max_download_mb * 1024 * 1024)
            ),
        ),
    )
    if ray_address is not None:
        from .distributed import RayOptions, ray_ingest

        ray_options = RayOptions(
            address=ray_address or "local", actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor
        )

        def run(progress=None):
            return ray_ingest(store, db, spec, encoder, parsed, options, ray_options, progress)
    else:
        ingestor = Ingestor(store, encoder, spec, options)
        run = ingestor.run

    if err.is_terminal and not as_json:
        columns = (
            SpinnerColumn(),
            TextColumn("[bold]ingest[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=err, transient=False) as bar:
            task = bar.add_task("ingest", total=None)
            progress = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
            report = run(progress) if ray_address is not None else run(parsed, progress)
    else:
        report = run() if ray_address is not None else run(parsed)

    if as_json:
        out.print_json(data=report.as_dict())
    else:
        rate = report.embedded / report.seconds if report.seconds > 0 else 0.0
        line = (
            f"embedded {report.embedded}, skipped {report.skipped}, failed {report.failed} "
            f"in {report.seconds:.2f} s ({rate:.1f} images/s)"
        )
        if report.previously_failed:
            line += f"; {report.previously_failed} failed in an earlier run (see `clipsearch failures`, --retry-failed)"
        if report.claimed_elsewhere:
            line += f"; {report.claimed_elsewhere} left to another ingest process"
        if report.repeated_ids:
            line += f"; {report.repeated_ids} repeated an id listed before (the first was used)"
        out.print(line, highlight=False)
        for f in report.failures[:20]:
            err.print(f"  failed: {f.source}: {f.reason}", highlight=False, markup=False)
        if len(report.failures) > 20:
            err.print(f"  ... and {len(report.failures) - 20} more (clipsearch failures)", highlight=False)
    store.close()
    if report.interrupted:
        raise typer.Exit(130)
    if report.failed or report.previously_failed:
        raise typer.Exit(1)


def _hits_output(hits, as_json: bool) -> None:
    if as_json:
        for h in hits:
            line = {
                "id": h.item.id,
                "score": round(h.score, 6),
                "path": h.item.metadata.get("path"),
                "metadata": h.item.metadata,
            }
            sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
        return
    if not hits:
        out.print("no results")
        return
    catalog = any("catalog" in h.item.metadata for h in hits)
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    if catalog:  # products are known by their id and where the image came from
        table.add_column("id", overflow="fold")
        table.add_column("image", overflow="fold")
    else:
        table.add_column("path", overflow="fold")
        table.add_column("label")
    for rank, h in enumerate(hits, 1):
        meta = h.item.metadata
        if catalog:
            where = meta.get("url") or meta.get("path") or ""
            table.add_row(str(rank), f"{h.score:.4f}", h.item.id, str(where))
        else:
            table.add_row(str(rank), f"{h.score:.4f}", str(meta.get("path", h.item.id)), str(meta.get("label", "")))
    out.print(table)


@app.command()
@handle_errors
def search(
    query: Annotated[str | None, typer.Argument(help="Text to search for.", show_default=False)] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Search by this image instead.")] = None,
    db: DbOpt = "clipsearch.db",
    namespace: NamespaceOpt = "default",
    limit: Annotated[int, typer.Option("--limit", "-k", min=1, help="Number of results.")] = 10,
    filter_: Annotated[
        list[str] | None, typer.Option("--filter", help="Only items whose metadata KEY=VALUE (repeatable).")
    ] = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    runtime: RuntimeOpt = None,
    precision: PrecisionOpt = None,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            envvar="CLIPSEARCH_SEARCH_MODE",
            help="vector (CLIP), keyword (words of item text and metadata, no model), or hybrid (both, fused).",
        ),
    ] = "vector",
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines: id, score, path, metadata.")] = False,
) -> None:
    """Search the store by text (QUERY) or by image (--image PATH)."""
    from .search import SEARCH_MODES, search_image, search_text

    if (query is None) == (image is None):
        raise UsageError("give a text QUERY or --image PATH (exactly one)")
    mode = mode.strip().lower()
    if mode not in SEARCH_MODES:
        raise UsageError(f"unknown --mode {mode!r}; use {', '.join(SEARCH_MODES)}")
    if image is not None and mode != "vector":
        raise UsageError(f"--mode {mode} searches by text; search by --image in vector mode")
    filters = _parse_filters(filter_)
    store = _open(db, must_exist=True)
    if mode == "keyword":
        if store.namespace(namespace) is None:
            raise UsageError(f"namespace {namespace!r} does not exist in {store.location}")
        hits = search_text(store, None, namespace, query or "", limit, filters, mode)
    else:
        encoder = _encoder_for_namespace(store, namespace, model, pretrained, weights, device, runtime, precision)
        if image is not None:
            hits = search_image(store, encoder, namespace, _query_image(encoder, image), limit, filters)
        else:
            hits = search_text(store, encoder, namespace, query or "", limit, filters, mode)
    _hits_output(hits, as_json)
    store.close()


@app.command()
@handle_errors
def similar(
    item_id: Annotated[str, typer.Argument(metavar="ID", help="The item (e.g. a catalog id).", show_default=False)],
    db: DbOpt = "clipsearch.db",
    namespace: NamespaceOpt = "default",
    limit: Annotated[int, typer.Option("--limit", "-k", min=1, help="Number of results.")] = 10,
    same_filter: Annotated[
        list[str] | None,
        typer.Option("--same-filter", help="Only items with the same value of this metadata key (repeatable)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines: id, score, path, metadata.")] = False,
) -> None:
    """Items nearest to item ID by image vector (the item itself left out). No model needed."""
    from .search import similar_items

    store = _open(db, must_exist=True)
    if store.namespace(namespace) is None:
        raise UsageError(f"namespace {namespace!r} does not exist in {store.location}")
    _hits_output(similar_items(store, namespace, item_id, limit, same_filter), as_json)
    store.close()


@app.command()
@handle_errors
def embed(
    text: Annotated[str | None, typer.Option("--text", help="Text to embed.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Image file to embed.")] = None,
    db: DbOpt = "clipsearch.db",
    namespace: NamespaceOpt = "default",
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    runtime: RuntimeOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Print the embedding of a text or an image as a JSON array.

    Uses the namespace's model when the database has one, else --model/--pretrained/--weights.
    """

    if (text is None) == (image is None):
        raise UsageError("give --text TEXT or --image PATH (exactly one)")
    recorded = None
    if "://" in db or Path(db).exists():
        store = _open(db)
        info = store.namespace(namespace)
        recorded = info.model_spec if info else None
        store.close()
    encoder = _load_encoder(_model_spec(model, pretrained, weights, device, recorded, runtime, precision))
    if image is not None:
        vector = encoder.embed_images([_query_image(encoder, image)])[0]
    else:
        vector = encoder.embed_texts([text or ""])[0]
    sys.stdout.write(json.dumps([round(float(x), 8) for x in vector]) + "\n")


@app.command()
@handle_errors
def duplicates(
    db: DbOpt = "clipsearch.db",
    namespace: NamespaceOpt = "default",
    threshold: Annotated[
        float,
        typer.Option("--threshold", min=0.0, max=1.0, help="Cosine similarity that counts as a duplicate."),
    ] = 0.95,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines, one group each.")] = False,
) -> None:
    """Groups of near-identical images: identical bytes first, then close vectors."""
    from .search import find_duplicates

    store = _open(db, must_exist=True)
    if store.namespace(namespace) is None:
        raise UsageError(f"namespace {namespace!r} does not exist in {store.location}")
    groups = find_duplicates(store, namespace, threshold)
    if as_json:
        for g in groups:
            sys.stdout.write(json.dumps(g.as_dict(), ensure_ascii=False) + "\n")
    elif not groups:
        out.print(f"no duplicates at threshold {threshold}")
    else:
        for i, g in enumerate(groups, 1):
            out.print(f"[bold]group {i}[/] ({g.kind}, {len(g.items)} items, similarity >= {g.score:.4f})")
            for it in g.items:
                out.print(f"  {it.metadata.get('path', it.id)}", highlight=False, markup=False)
    store.close()


@app.command()
@handle_errors
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
    db: DbOpt = "clipsearch.db",
    namespace: NamespaceOpt = "default",
) -> None:
    """Export a namespace's vectors and metadata."""
    from .search import export_seed_compatible, export_vectors

    if format_ not in ("npy", "seed-compatible"):
        raise UsageError(f"unknown --format {format_!r}; use npy or seed-compatible")
    if format_ == "npy" and (npy is None or meta is None):
        raise UsageError("--format npy needs --npy FILE and --meta FILE")
    if format_ == "seed-compatible" and out_dir is None:
        raise UsageError("--format seed-compatible needs --out DIR")
    store = _open(db, must_exist=True)
    if store.namespace(namespace) is None:
        raise UsageError(f"namespace {namespace!r} does not exist in {store.location}")
    if format_ == "npy":
        assert npy is not None and meta is not None
        n = export_vectors(store, namespace, npy, meta)
        out.print(f"exported {n} vectors to {npy} and metadata to {meta}", highlight=False)
    else:
        assert out_dir is not None
        n = export_seed_compatible(store, namespace, out_dir)
        out.print(f"exported {n} vectors with an HNSW index to {out_dir}", highlight=False)
    store.close()


@app.command()
@handle_errors
def info(db: DbOpt = "clipsearch.db", as_json: JsonOpt = False) -> None:
    """Per namespace: model, dimensions, items, failures, index kind and freshness."""
    store = _open(db, must_exist=True)
    rows = []
    for ns in store.namespaces():
        status = store.index_status(ns.name)
        rows.append(
            {
                "namespace": ns.name,
                "model": ns.identity.model_id,
                "backend": ns.identity.backend,
                "dim": ns.identity.dim,
                "items": ns.items,
                "failures": ns.failures,
                "index": status.kind,
                "index_fresh": status.fresh,
                "identity": ns.identity.as_dict(),
                "model_spec": ns.model_spec,
            }
        )
    if as_json:
        out.print_json(data={"db": store.location, "namespaces": rows})
    else:
        out.print(f"database: {store.location}", highlight=False)
        table = Table(show_edge=False, pad_edge=False)
        for col in ("namespace", "model", "dim", "items", "failures", "index"):
            table.add_column(col)
        for r in rows:
            index = "none" if r["index"] == "none" else f"{r['index']} ({'fresh' if r['index_fresh'] else 'stale'})"
            table.add_row(
                r["namespace"],
                f"{r['backend']} {r['model']}",
                str(r["dim"]),
                str(r["items"]),
                str(r["failures"]),
                index,
            )
        out.print(table)
    store.close()


@app.command()
@handle_errors
def failures(
    db: DbOpt = "clipsearch.db",
    namespace: Annotated[
        str | None,
        typer.Option("--namespace", "-n", envvar="CLIPSEARCH_NAMESPACE", help="Only this namespace."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines, one failure each.")] = False,
) -> None:
    """List the items that failed to ingest, with their reasons."""
    store = _open(db, must_exist=True)
    rows = store.failures(namespace)
    if as_json:
        for f in rows:
            line = {
                "namespace": f.namespace,
                "id": f.id,
                "source": f.source,
                "reason": f.reason,
                "attempts": f.attempts,
                "last_failed_at": f.last_failed_at,
            }
            sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
    elif not rows:
        out.print("no failures")
    else:
        table = Table(show_edge=False, pad_edge=False)
        for col in ("namespace", "source", "reason", "attempts"):
            table.add_column(col, overflow="fold")
        for f in rows:
            table.add_row(f.namespace, f.source, f.reason, str(f.attempts))
        out.print(table)
    store.close()


@app.command()
@handle_errors
def serve(
    db: DbOpt = "clipsearch.db",
    namespace: Annotated[
        str,
        typer.Option(
            "--namespace", "-n", envvar="CLIPSEARCH_NAMESPACE", help="Namespace used when a request names none."
        ),
    ] = "default",
    host: Annotated[str, typer.Option("--host", envvar="CLIPSEARCH_HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", envvar="CLIPSEARCH_PORT", min=0, max=65535)] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar="CLIPSEARCH_API_KEY", help="Require 'Authorization: Bearer KEY' on every API call."
        ),
    ] = None,
    allow_private_urls: Annotated[
        bool,
        typer.Option(
            "--allow-private-urls",
            envvar="CLIPSEARCH_ALLOW_PRIVATE_URLS",
            help="Let image URLs point at loopback, private and link-local addresses (off: SSRF guard).",
        ),
    ] = False,
    max_request_mb: Annotated[
        float, typer.Option("--max-request-mb", envvar="CLIPSEARCH_MAX_REQUEST_MB", min=0.001)
    ] = 32.0,
    max_image_mb: Annotated[
        float,
        typer.Option("--max-image-mb", envvar="CLIPSEARCH_MAX_IMAGE_MB", min=0.001, help="Per image (upload or URL)."),
    ] = 20.0,
    max_megapixels: Annotated[
        float, typer.Option("--max-megapixels", envvar="CLIPSEARCH_MAX_MEGAPIXELS", help="0: no limit.")
    ] = 50.0,
    url_timeout: Annotated[
        float, typer.Option("--url-timeout", envvar="CLIPSEARCH_URL_TIMEOUT", min=0.1, help="Seconds per image URL.")
    ] = 10.0,
    max_batch: Annotated[
        int, typer.Option("--max-batch", envvar="CLIPSEARCH_MAX_BATCH", min=1, help="Images per model call.")
    ] = 32,
    batch_wait_ms: Annotated[
        float,
        typer.Option(
            "--batch-wait-ms",
            envvar="CLIPSEARCH_BATCH_WAIT_MS",
            min=0.0,
            help="Under load, how long a batch may wait to fill up.",
        ),
    ] = 5.0,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    runtime: RuntimeOpt = None,
    precision: PrecisionOpt = None,
    log_level: Annotated[str, typer.Option("--log-level", envvar="CLIPSEARCH_LOG_LEVEL")] = "info",
) -> None:
    """Run the HTTP API (OpenAI-compatible /v1/embeddings, search, items) and the web gallery."""
    import uvicorn

    from .encoders import load_encoder
    from .server import ServerSettings, create_app
    from .store import validate_namespace

    validate_namespace(namespace)
    store = _open(db)
    info = store.namespace(namespace)
    spec = _model_spec(model, pretrained, weights, device, info.model_spec if info else None, runtime, precision)
    settings = ServerSettings(
        db=db,
        namespace=namespace,
        api_key=api_key or None,
        allow_private_urls=allow_private_urls,
        max_request_bytes=int(max_request_mb * 1024 * 1024),
        max_image_bytes=int(max_image_mb * 1024 * 1024),
        max_megapixels=max_megapixels,
        url_timeout=url_timeout,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
    )
    web = create_app(settings, lambda: (load_encoder(spec, serving=True), spec), store=store)
    config = uvicorn.Config(web, host=host, port=port, log_level=log_level.lower(), access_log=False)
    server = uvicorn.Server(config)
    failure: list[str] = []

    def stop(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    web.state.service.on_load_failure = stop
    source = f"{spec.model} from {spec.weights}" if spec.weights else spec.model
    err.print(f"serving {db} on http://{host}:{port} (docs: /docs); loading {source} ...", highlight=False)
    server.run()
    if failure:
        raise ClipsearchError(failure[0])


db_app = typer.Typer(help="The store itself: schema version and migrations.", no_args_is_help=True)
index_app = typer.Typer(help="The vector index of a namespace.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(index_app, name="index")


@db_app.command("migrate")
@handle_errors
def db_migrate(db: DbOpt = "clipsearch.db") -> None:
    """Create the schema, or bring it up to this version of clipsearch (every command also does
    this when it opens the store)."""
    from .store import open_store

    store = open_store(db)
    before = getattr(store, "schema_version_before", None)
    now = store.schema_version()
    if before is not None and before != now:
        out.print(f"{store.location}: schema {before or '(none)'} -> {now}", highlight=False)
    else:
        out.print(f"{store.location}: schema {now}, up to date", highlight=False)
    store.close()


@index_app.command("build")
@handle_errors
def index_build(
    db: DbOpt = "clipsearch.db",
    namespace: NamespaceOpt = "default",
    kind: Annotated[
        str,
        typer.Option(
            "--kind",
            envvar="CLIPSEARCH_INDEX",
            help="hnsw, flat (SQLite only) or auto (SQLite: by size; PostgreSQL: hnsw).",
        ),
    ] = "auto",
) -> None:
    """Build (or bring up to date) the namespace's vector index: FAISS beside SQLite, an HNSW
    index (vector_ip_ops) in PostgreSQL. HNSW settings come from CLIPSEARCH_HNSW_M and
    CLIPSEARCH_EF_CONSTRUCTION."""
    from .store import is_postgres_url

    store = _open(db, must_exist=True)
    if store.namespace(namespace) is None:
        raise UsageError(f"namespace {namespace!r} does not exist in {store.location}")
    if is_postgres_url(db) and kind == "auto":
        kind = "hnsw"
    status = store.build_index(namespace, kind)
    out.print(f"{namespace}: {status.kind} index over {status.vectors} vectors", highlight=False)
    store.close()


worker_app = typer.Typer(
    help="Keep the vector column of an existing PostgreSQL table filled (run without a subcommand).",
    invoke_without_command=True,
)
app.add_typer(worker_app, name="worker")
_W = "Table"


@worker_app.callback()
@handle_errors
def worker(
    ctx: typer.Context,
    db: Annotated[
        str | None, typer.Option("--db", envvar="CLIPSEARCH_DB", help="postgresql://user:pass@host/db")
    ] = None,
    table: Annotated[
        str | None, typer.Option("--table", help="The table (schema.table allowed).", rich_help_panel=_W)
    ] = None,
    id_column: Annotated[str, typer.Option("--id-column", help="Its key column.", rich_help_panel=_W)] = "id",
    image_column: Annotated[
        str | None, typer.Option("--image-column", help="Embed the image at this URL or path.", rich_help_panel=_W)
    ] = None,
    text_column: Annotated[
        str | None, typer.Option("--text-column", help="Embed this text instead.", rich_help_panel=_W)
    ] = None,
    vector_column: Annotated[
        str, typer.Option("--vector-column", help="The vector(d) column to fill.", rich_help_panel=_W)
    ] = "embedding",
    status_column: Annotated[
        str | None,
        typer.Option("--status-column", help="Set to done or failed; 'pending' requeues a row.", rich_help_panel=_W),
    ] = None,
    error_column: Annotated[
        str | None, typer.Option("--error-column", help="Gets the reason of a failure.", rich_help_panel=_W)
    ] = None,
    model_column: Annotated[
        str | None, typer.Option("--model-column", help="Gets the model version.", rich_help_panel=_W)
    ] = None,
    model_version: Annotated[
        str | None,
        typer.Option(
            "--model-version", help="What --model-column records (default: the model id, e.g. ViT-B-32/openai)."
        ),
    ] = None,
    requeue_zero: Annotated[
        bool, typer.Option("--requeue-zero", help="Treat rows whose vector is all zeros as pending.")
    ] = False,
    requeue_model_mismatch: Annotated[
        bool,
        typer.Option("--requeue-model-mismatch", help="Treat rows whose --model-column differs as pending."),
    ] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Treat rows marked failed as pending.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Keep going: poll, and wake on NOTIFY (see install-trigger).")
    ] = False,
    poll_interval: Annotated[
        float,
        typer.Option("--poll-interval", min=0.1, envvar="CLIPSEARCH_POLL_INTERVAL", help="Seconds, with --watch."),
    ] = 5.0,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, envvar="CLIPSEARCH_BATCH_SIZE", help="Rows per transaction.")
    ] = 32,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", envvar="CLIPSEARCH_CACHE_DIR", help="Download cache.")
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, envvar="CLIPSEARCH_CONCURRENCY", help="Downloads at once.")
    ] = 16,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    runtime: RuntimeOpt = None,
    precision: PrecisionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Embed the rows of TABLE that need it: vector NULL, status 'pending' (and, if asked, zero
    vectors and other model versions). Several workers may run at once; SIGTERM finishes the
    batch in hand and exits."""
    if ctx.invoked_subcommand is not None:
        return
    import signal
    import threading

    from .downloads import DownloadSettings
    from .worker import Worker, WorkerOptions

    if not db or "://" not in db:
        raise UsageError("the worker needs --db postgresql://user:pass@host/db (or CLIPSEARCH_DB)")
    if not table:
        raise UsageError("give --table: the table whose vectors to fill")
    options = WorkerOptions(
        table=table,
        id_column=id_column,
        vector_column=vector_column,
        image_column=image_column,
        text_column=text_column,
        status_column=status_column,
        error_column=error_column,
        model_column=model_column,
        model_version=model_version,
        batch_size=batch_size,
        watch=watch,
        poll_interval=poll_interval,
        requeue_zero=requeue_zero,
        requeue_model_mismatch=requeue_model_mismatch,
        retry_failed=retry_failed,
        cache_dir=cache_dir,
        download=DownloadSettings(concurrency=concurrency),
    )
    if (image_column is None) == (text_column is None):
        raise UsageError("give --image-column (embed images) or --text-column (embed texts), exactly one")
    encoder = _load_encoder(_model_spec(model, pretrained, weights, device, None, runtime, precision))
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: do not wait for the batch
        stop.set()
        err.print("stopping after the current batch ...", highlight=False)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        runner = Worker(db, encoder, options)
        try:
            err.print(f"{runner.pending_count()} rows pending in {table}", highlight=False)

            def progress(report) -> None:
                if not as_json:
                    err.print(f"  embedded {report.embedded}, failed {report.failed}", highlight=False)

            try:
                report = runner.run(stop, on_batch=progress)
            except runner.psycopg.OperationalError as e:
                # the batch in hand was rolled back; nothing half-written stays behind
                raise ClipsearchError(f"lost the database connection: {str(e).strip().splitlines()[0]}") from None
        finally:
            runner.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if as_json:
        out.print_json(data=report.as_dict())
    else:
        out.print(
            f"embedded {report.embedded}, failed {report.failed} in {report.batches} batches, {report.seconds:.2f} s",
            highlight=False,
        )
        for row_id, reason in report.failures[:20]:
            err.print(f"  failed: {row_id}: {reason}", highlight=False, markup=False)
    if report.failed and not stop.is_set() and not watch:
        raise typer.Exit(1)


@worker_app.command("install-trigger")
@handle_errors
def worker_install_trigger(
    db: Annotated[str, typer.Option("--db", envvar="CLIPSEARCH_DB", help="postgresql://user:pass@host/db")],
    table: Annotated[str, typer.Option("--table", help="The table (schema.table allowed).")],
    image_column: Annotated[str | None, typer.Option("--image-column")] = None,
    text_column: Annotated[str | None, typer.Option("--text-column")] = None,
    vector_column: Annotated[str, typer.Option("--vector-column")] = "embedding",
    status_column: Annotated[str | None, typer.Option("--status-column")] = None,
) -> None:
    """Add triggers to TABLE: NOTIFY waiting workers when rows arrive or their source changes,
    and clear the vector (status 'pending') of a row whose image or text changed."""
    from .worker import install_trigger

    if (image_column is None) == (text_column is None):
        raise UsageError("give --image-column or --text-column (the source column), exactly one")
    if "://" not in db:
        raise UsageError("install-trigger needs --db postgresql://user:pass@host/db")
    channel = install_trigger(db, table, image_column or text_column or "", vector_column, status_column)
    out.print(f"triggers installed on {table}; workers with --watch listen on {channel}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
