"""``clipsearch ingest``: embed folders, image lists and catalogs into a collection."""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..choice import ModelChoice
from ..errors import UsageError
from ..settings import DEFAULT_DB
from ._common import (
    CATALOG_PANEL,
    CacheDirOpt,
    ConcurrencyOpt,
    DbOpt,
    DownloadTimeoutOpt,
    JsonOpt,
    MaxDownloadMbOpt,
    NamespaceOpt,
    RetriesOpt,
    download_settings,
    err,
    failure_line,
    hooks,
    kinds_text,
    out,
    parse_filters,
    rate_column,
)

if TYPE_CHECKING:
    from rich.progress import Progress

    from ..pipeline import IngestPreview, IngestReport


def progress_bar() -> Progress:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        SpinnerColumn(),
        TextColumn("[bold]ingest[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        rate_column(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=err, transient=False)


def ingest(
    sources: Annotated[
        list[str],
        typer.Argument(help="DIR, images:DIR, image-list:FILE, or an image file.", show_default=False),
    ],
    db: DbOpt = DEFAULT_DB,
    namespace: NamespaceOpt = "default",
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
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Keep the namespace in step with the sources: remove the items of these folders, image lists "
            "and catalogs whose file or row is gone; a renamed or moved file keeps its vector. Not with --limit, "
            "--filter or --sample.",
        ),
    ] = False,
    filter_: Annotated[
        list[str] | None,
        typer.Option(
            "--filter", help="Only items (catalog rows) whose KEY=VALUE (repeatable).", rich_help_panel=CATALOG_PANEL
        ),
    ] = None,
    sample: Annotated[
        int | None,
        typer.Option("--sample", min=0, help="A reproducible random sample of N items.", rich_help_panel=CATALOG_PANEL),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Which sample --sample takes.", rich_help_panel=CATALOG_PANEL)
    ] = 0,
    id_column: Annotated[
        str, typer.Option("--id-column", help="Catalog column with the item id.", rich_help_panel=CATALOG_PANEL)
    ] = "id",
    image_column: Annotated[
        str | None,
        typer.Option(
            "--image-column",
            help="Catalog column with the image URL or path (default: image_url, image, url, image_path or path).",
            rich_help_panel=CATALOG_PANEL,
        ),
    ] = None,
    text_columns: Annotated[
        str | None,
        typer.Option(
            "--text-columns",
            help="Comma-separated catalog columns that make the item's text (keyword search, --embed-text).",
            rich_help_panel=CATALOG_PANEL,
        ),
    ] = None,
    embed_text: Annotated[
        bool,
        typer.Option(
            "--embed-text", help="Also store the text tower's vector of the item's text.", rich_help_panel=CATALOG_PANEL
        ),
    ] = False,
    download_missing: Annotated[
        bool,
        typer.Option(
            "--download-missing/--offline",
            envvar="CLIPSEARCH_DOWNLOAD",
            help="Download image URLs not in the cache, or use the cache only (the rest fail as 'not cached').",
            rich_help_panel=CATALOG_PANEL,
        ),
    ] = True,
    cache_dir: CacheDirOpt = None,
    concurrency: ConcurrencyOpt = 16,
    download_timeout: DownloadTimeoutOpt = 20.0,
    retries: RetriesOpt = 3,
    max_download_mb: MaxDownloadMbOpt = 50.0,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray",
            envvar="CLIPSEARCH_RAY",
            help="Run on a Ray cluster: local (a cluster for this run; also --ray alone), auto, or ray://HOST:10001.",
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
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Say what would happen (items listed, skipped, to embed, to fetch, failing at once) and stop: "
            "no model, no download, no write.",
        ),
    ] = False,
    as_json: JsonOpt = False,
    progress: Annotated[
        str,
        typer.Option(
            "--progress",
            envvar="CLIPSEARCH_PROGRESS",
            help="auto (a bar on a terminal, else plain), bar, plain (a line every --progress-every seconds, "
            "for logs), or none.",
        ),
    ] = "auto",
    progress_every: Annotated[
        float,
        typer.Option(
            "--progress-every", min=0.1, envvar="CLIPSEARCH_PROGRESS_EVERY", help="Seconds between plain lines."
        ),
    ] = 30.0,
    max_failure_rate: Annotated[
        str | None,
        typer.Option(
            "--max-failure-rate",
            envvar="CLIPSEARCH_MAX_FAILURE_RATE",
            help="Exit 0 (with a warning) while failed items stay within this share of the items, e.g. 5% or 0.05.",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show the log of Ray (with --ray).")] = False,
    *,
    choice: ModelChoice,
) -> None:
    """Embed images from folders, image lists and catalogs into the store (resumable, incremental)."""
    from ..catalog import CatalogOptions
    from ..collection import Collection
    from ..pipeline import IngestOptions
    from ..store import database_exists, open_store, validate_namespace

    validate_namespace(namespace)
    if progress not in PROGRESS_MODES:
        raise UsageError(f"--progress {progress!r}: use one of {', '.join(PROGRESS_MODES)}")
    tolerated = failure_rate(max_failure_rate) if max_failure_rate is not None else None
    filters = parse_filters(filter_)
    columns = [c.strip() for c in (text_columns or "").split(",") if c.strip()]
    if embed_text and not columns:
        raise UsageError("--embed-text needs --text-columns: the catalog columns to embed")
    ray = None
    if ray_address is not None:
        from ..distributed import RayOptions

        ray = RayOptions(
            address=ray_address or "local",
            actors=actors,
            gpus_per_actor=gpus_per_actor,
            cpus_per_actor=cpus_per_actor,
            verbose=verbose,
        )
    options = IngestOptions(
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
        cache_dir=cache_dir,
        download=download_settings(concurrency, download_timeout, retries, max_download_mb),
    )
    catalog = CatalogOptions(id_column, image_column, columns, embed_text)
    # the model loads only if there is something to embed
    with contextlib.ExitStack() as stack:
        location: str | Path = db
        if dry_run and not database_exists(db):  # a dry run creates no database: an empty one, thrown away
            location = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "dry-run.db"
        collection = stack.enter_context(Collection(open_store(location), namespace, choice, db=db, **hooks()))
        # sources are checked before the model loads: a typo costs nothing
        parsed = collection.parse_sources(sources, recursive=recursive, catalog=catalog, filters=filters)
        if dry_run:
            if prune:
                raise UsageError("--dry-run does not preview --prune; run `clipsearch ingest` without --prune first")
            if ray is not None:
                raise UsageError("--dry-run runs here, without Ray: leave out --ray")
            print_preview(collection.preview_ingest(parsed, options), as_json)
            return
        if progress == "auto":
            progress = "bar" if err.is_terminal and not as_json else "plain"
        if progress == "bar":
            with progress_bar() as bar:
                task = bar.add_task("ingest", total=None)
                report = collection.ingest(
                    parsed,
                    options,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                    ray=ray,
                    prune=prune,
                )
        else:
            lines = PlainProgress(progress_every) if progress == "plain" else None
            report = collection.ingest(parsed, options, progress=lines, ray=ray, prune=prune)
    print_report(report, as_json)
    if report.interrupted:
        raise typer.Exit(130)
    failed = report.failed + report.previously_failed
    if failed:
        considered = report.embedded + report.skipped + failed
        if tolerated is None or failed > tolerated * considered:
            raise typer.Exit(1)
        err.print(
            f"warning: {failed} of {considered} items failed ({failed / considered:.1%}), within "
            f"--max-failure-rate {tolerated:.1%}: exit 0",
            highlight=False,
        )


def print_preview(p: IngestPreview, as_json: bool) -> None:
    if as_json:
        out.print_json(data=p.as_dict())
        return
    left_out = p.listed - p.selected - p.repeated_ids
    lines = [f"dry run: {p.listed} items listed, {p.selected} selected"]
    if left_out:
        lines[0] += f" ({left_out} left out by --filter or --sample)"
    if p.repeated_ids:
        lines[0] += f"; {p.repeated_ids} repeated an id listed before (the first is used)"
    lines.append(f"  skip {p.unchanged} stored and unchanged, {p.previously_failed} failed before and unchanged")
    todo = p.new + p.changed
    embed = f"  embed up to {todo}: {p.new} new, {p.changed} changed (embedded again if the image changed)"
    if p.limit is not None and p.limit < todo:
        embed += f"; at most {p.limit} (--limit)"
    lines.append(embed)
    lines.append(f"  read {p.files} files; fetch {p.to_fetch} URLs, {p.cached} more from the download cache")
    if p.will_fail:
        lines.append(f"  fail at once: {kinds_text(p.will_fail)}")
    if p.previously_failed:
        lines.append("  (--retry-failed would try the items that failed before again)")
    for line in lines:
        out.print(line, highlight=False, markup=False)


PROGRESS_MODES = ("auto", "bar", "plain", "none")


def failure_rate(text: str) -> float:
    """``5%`` or ``0.05`` as 0.05; UsageError for anything else."""
    given = text.strip()
    try:
        rate = float(given[:-1]) / 100 if given.endswith("%") else float(given)
    except ValueError:
        rate = -1.0
    if not 0 <= rate <= 1:
        raise UsageError(f"--max-failure-rate {text!r}: give a share of the items, like 5% or 0.05")
    return rate


class PlainProgress:
    """Progress as a plain line on stderr every ``every`` seconds: what a log (cron, CI, a
    container) can keep, where a bar would be silent or garbled."""

    def __init__(self, every: float):
        self.every = every
        self.started = time.monotonic()
        self.last = self.started

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every or not total:
            return
        self.last = now
        rate = done / (now - self.started)
        eta = f", eta {_duration((total - done) / rate)}" if rate > 0 and done < total else ""
        line = f"ingest: {done} of {total} ({done / total:.0%}), {rate:.1f} items/s{eta}"
        err.print(line, highlight=False, markup=False)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def print_report(report: IngestReport, as_json: bool) -> None:
    if as_json:
        out.print_json(data=report.as_dict())
        return
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
    if report.removed or report.moved:
        line += f"; removed {report.removed} whose file is gone, kept {report.moved} moved or renamed"
    out.print(line, highlight=False)
    if report.failures:
        err.print(f"failed by kind: {kinds_text(report.failures_by_kind())}", highlight=False, markup=False)
    for f in report.failures[:20]:
        err.print(f"  failed: {failure_line(f)}", highlight=False, markup=False)
    if len(report.failures) > 20:
        err.print(f"  ... and {len(report.failures) - 20} more (`clipsearch failures` lists them all)", highlight=False)
