"""``clipsearch watch``: keep a namespace in step with folders while it runs (``clipsearch.watch``)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated

import typer

from ..choice import ModelChoice
from ..errors import UsageError
from ..settings import DEFAULT_DB
from ._common import DbOpt, JsonOpt, NamespaceOpt, err, hooks, out


def watch(
    folders: Annotated[list[Path], typer.Argument(help="Folders to keep in step.", show_default=False)],
    db: DbOpt = DEFAULT_DB,
    namespace: NamespaceOpt = "default",
    prune: Annotated[
        bool,
        typer.Option(
            "--prune/--no-prune",
            help="Remove the items of deleted files (a moved or renamed file keeps its vector).",
        ),
    ] = True,
    recursive: Annotated[bool, typer.Option("--recursive/--no-recursive", help="Descend into subfolders.")] = True,
    quiet_ms: Annotated[
        int,
        typer.Option(
            "--quiet-ms",
            min=50,
            help="Apply changes once the folders were quiet this long (a file being copied is read whole).",
        ),
    ] = 500,
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", min=1, envvar="CLIPSEARCH_BATCH_SIZE", help="Images per model call."),
    ] = 32,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, envvar="CLIPSEARCH_WORKERS", help="Decode workers.")
    ] = None,
    max_megapixels: Annotated[
        float, typer.Option("--max-megapixels", envvar="CLIPSEARCH_MAX_MEGAPIXELS", help="0: no limit.")
    ] = 50.0,
    as_json: JsonOpt = False,
    *,
    choice: ModelChoice,
) -> None:
    """Keep a namespace in step with folders while it runs: new and changed images are embedded
    in batches, deleted ones removed, moved ones keep their vector; a line per batch. Stops on
    Ctrl-C or SIGTERM once the batch in flight is stored (a second one stops at once)."""
    from ..collection import Collection
    from ..pipeline import IngestOptions
    from ..store import open_store, validate_namespace
    from ..watch import Watcher, WatchEvent, describe

    validate_namespace(namespace)
    for folder in folders:
        if not folder.expanduser().is_dir():
            raise UsageError(f"cannot watch {folder}: no such folder")

    def tell(event: WatchEvent) -> None:
        if as_json:
            data = {"event": event.kind, "changes": event.changes, "missing": [str(p) for p in event.missing]}
            if event.report is not None:
                data.update(event.report.as_dict())
            out.print(json.dumps(data), highlight=False, soft_wrap=True)
        else:
            out.print(describe(event), highlight=False)

    with Collection(open_store(db), namespace, choice, db=db, **hooks()) as collection:
        watcher = Watcher(
            collection,
            folders,
            prune=prune,
            recursive=recursive,
            quiet_ms=quiet_ms,
            on_event=tell,
            options=IngestOptions(batch_size=batch_size, workers=workers, max_megapixels=max_megapixels),
        )

        def request_stop(signum: int, frame: object) -> None:
            if watcher.stopping:
                # a second Ctrl-C or SIGTERM: do not wait for the batch (its transaction is
                # rolled back; the next run embeds those files)
                raise KeyboardInterrupt
            watcher.stop()
            err.print("stopping after the current batch (again to stop at once) ...", highlight=False)

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            err.print(f"watching {', '.join(map(str, folders))} (Ctrl-C to stop)", highlight=False)
            watcher.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    err.print("stopped", highlight=False)
