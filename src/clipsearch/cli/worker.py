"""``clipsearch worker``: keep the vector column of an application's PostgreSQL table filled."""

from __future__ import annotations

from typing import Annotated

import typer

from ..choice import ModelChoice
from ..errors import ClipsearchError, UsageError
from ._common import (
    CacheDirOpt,
    ConcurrencyOpt,
    DownloadTimeoutOpt,
    JsonOpt,
    MaxDownloadMbOpt,
    RetriesOpt,
    download_settings,
    err,
    loading,
    out,
    parse_filters,
)

TABLE_PANEL = "Table"
worker_app = typer.Typer(
    help="Keep the vector column of an existing PostgreSQL table filled (run without a subcommand).",
    invoke_without_command=True,
)


def worker(
    ctx: typer.Context,
    db: Annotated[
        str | None, typer.Option("--db", envvar="CLIPSEARCH_DB", help="postgresql://user:pass@host/db")
    ] = None,
    table: Annotated[
        str | None, typer.Option("--table", help="The table (schema.table allowed).", rich_help_panel=TABLE_PANEL)
    ] = None,
    id_column: Annotated[str, typer.Option("--id-column", help="Its key column.", rich_help_panel=TABLE_PANEL)] = "id",
    image_column: Annotated[
        str | None,
        typer.Option("--image-column", help="Embed the image at this URL or path.", rich_help_panel=TABLE_PANEL),
    ] = None,
    text_column: Annotated[
        str | None, typer.Option("--text-column", help="Embed this text instead.", rich_help_panel=TABLE_PANEL)
    ] = None,
    vector_column: Annotated[
        str, typer.Option("--vector-column", help="The vector(d) column to fill.", rich_help_panel=TABLE_PANEL)
    ] = "embedding",
    status_column: Annotated[
        str | None,
        typer.Option(
            "--status-column", help="Set to done or failed; 'pending' requeues a row.", rich_help_panel=TABLE_PANEL
        ),
    ] = None,
    error_column: Annotated[
        str | None, typer.Option("--error-column", help="Gets the reason of a failure.", rich_help_panel=TABLE_PANEL)
    ] = None,
    model_column: Annotated[
        str | None, typer.Option("--model-column", help="Gets the model version.", rich_help_panel=TABLE_PANEL)
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
    cache_dir: CacheDirOpt = None,
    concurrency: ConcurrencyOpt = 16,
    download_timeout: DownloadTimeoutOpt = 20.0,
    retries: RetriesOpt = 3,
    max_download_mb: MaxDownloadMbOpt = 50.0,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Embed at most N rows this run.")] = None,
    filter_: Annotated[
        list[str] | None,
        typer.Option(
            "--filter",
            help="Only rows whose COLUMN=VALUE (repeatable: all must hold; a column repeated: any of its "
            "values); COLUMN~=VALUE ignores the case of A-Z; COLUMN>=VALUE, <=, >, < for ranges.",
        ),
    ] = None,
    as_json: JsonOpt = False,
    *,
    choice: ModelChoice,
) -> None:
    """Embed the rows of TABLE that need it: vector NULL, status 'pending' (and, if asked, zero
    vectors and other model versions). Several workers may run at once; SIGTERM finishes the
    batch in hand and exits."""
    from ..store import is_postgres_url

    if ctx.invoked_subcommand is not None:
        return
    import signal
    import threading

    from ..encoders import load_encoder
    from ..table_worker import Worker, WorkerOptions

    if not db or not is_postgres_url(db):
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
        download=download_settings(concurrency, download_timeout, retries, max_download_mb),
        limit=limit,
        filters=parse_filters(filter_) or {},
    )
    if (image_column is None) == (text_column is None):
        raise UsageError("give --image-column (embed images) or --text-column (embed texts), exactly one")
    spec = choice.resolve(None)  # an application table records no model: the flags, else the default
    with loading(spec.label):
        encoder = load_encoder(spec)
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
    from ..store import is_postgres_url
    from ..table_worker import install_trigger

    if (image_column is None) == (text_column is None):
        raise UsageError("give --image-column or --text-column (the source column), exactly one")
    if not is_postgres_url(db):
        raise UsageError("install-trigger needs --db postgresql://user:pass@host/db")
    channel = install_trigger(db, table, image_column or text_column or "", vector_column, status_column)
    out.print(f"triggers installed on {table}; workers with --watch listen on {channel}", highlight=False)
