"""What every command shares: the consoles, error wording, the option definitions (the model
options are declared here once), filters, the progress bar and result tables.

Commands are thin: they parse, call ``clipsearch.Collection`` (or the store), and print. Library
errors are worded here for a terminal: an argument the library names (``same_filter``) is shown
as its flag (``--same-filter``).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
import sys
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..choice import ModelChoice
from ..errors import ClipsearchError, NamespaceNotFoundError, NoDatabaseError, UsageError, Wording

# No markup: what we print holds paths, ids and install lines (``clipsearch[postgres]``,
# ``holiday[red].jpg``) that Rich would read as style tags; styles are given as ``Text`` spans.
out = Console(soft_wrap=True, markup=False)
err = Console(stderr=True, soft_wrap=True, markup=False)


def print_table(table: Table) -> None:
    """A table at its natural width: a path or id is never broken across lines (it can be copied
    or piped whole); on a narrower terminal the lines run long instead."""
    from rich.measure import Measurement

    natural = Measurement.get(out, out.options.update(width=10_000), table).maximum
    if natural <= out.width:
        out.print(table)
        return
    # Console.print never renders wider than its console: a console as wide as the table
    wide = Console(
        file=out.file,
        width=min(natural, 10_000),
        markup=False,
        soft_wrap=True,
        force_terminal=out.is_terminal,
        color_system=out.color_system,  # type: ignore[arg-type]
        no_color=out.no_color,
    )
    wide.print(table)


F = TypeVar("F", bound=Callable[..., Any])
CATALOG_PANEL = "Catalogs and selection"

# -- options shared by several commands ----------------------------------------------------------
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
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON).")]
LimitOpt = Annotated[int, typer.Option("--limit", "-k", min=1, help="Number of results.")]
HitsJsonOpt = Annotated[bool, typer.Option("--json", help="JSON lines: id, score, path, metadata.")]

# Downloads of image URLs, declared once for every command that fetches them (ingest, worker)
DOWNLOAD_PANEL = "Downloads"
CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        envvar="CLIPSEARCH_CACHE_DIR",
        help="Download cache (default: DB-cache beside a SQLite database, ~/.cache/clipsearch/downloads for "
        "PostgreSQL).",
        rich_help_panel=DOWNLOAD_PANEL,
    ),
]
ConcurrencyOpt = Annotated[
    int,
    typer.Option(
        "--concurrency",
        min=1,
        envvar="CLIPSEARCH_CONCURRENCY",
        help="Downloads at once.",
        rich_help_panel=DOWNLOAD_PANEL,
    ),
]
DownloadTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--download-timeout",
        min=0.1,
        envvar="CLIPSEARCH_DOWNLOAD_TIMEOUT",
        help="Seconds a URL may take in all, every attempt, redirect and back-off included.",
        rich_help_panel=DOWNLOAD_PANEL,
    ),
]
RetriesOpt = Annotated[
    int,
    typer.Option(
        "--retries",
        min=0,
        envvar="CLIPSEARCH_RETRIES",
        help="Retries of a download after a timeout, a broken connection, 5xx or 429 (with backoff), "
        "within --download-timeout.",
        rich_help_panel=DOWNLOAD_PANEL,
    ),
]
MaxDownloadMbOpt = Annotated[
    float,
    typer.Option(
        "--max-download-mb",
        min=0.001,
        envvar="CLIPSEARCH_MAX_DOWNLOAD_MB",
        help="Refuse larger downloads.",
        rich_help_panel=DOWNLOAD_PANEL,
    ),
]


def short_reason(source: str, reason: str) -> str:
    """A failure's reason without its source in front: a URL's reason starts with the URL
    already (``URL: answered HTTP 404``), which a line that shows the source need not repeat."""
    return reason[len(source) :].lstrip(": ") if source and reason.startswith(source) else reason


def own_id(f: Any) -> str:
    """A failed item's id where a person gave it (a catalog's product id); "" for a file's id,
    which is a digest of its path and says nothing the source does not."""
    from ..sources import file_id

    return "" if f.id in (f.source, file_id(Path(f.source))) else f.id


def failure_line(f: Any) -> str:
    """One failure on one line: source, reason, and the item's own id, if it has one."""
    line, item_id = f"{f.source}: {short_reason(f.source, f.reason)}", own_id(f)
    return f"{line} (id {item_id})" if item_id else line


def kinds_text(counts: dict[str, int]) -> str:
    """Failures counted by kind, on one line: ``HTTP 404: 61, timed out: 12``."""
    return ", ".join(f"{kind}: {n}" for kind, n in counts.items())


def download_settings(concurrency: int, timeout: float, retries: int, max_mb: float) -> Any:
    """The download options as the library's ``DownloadSettings``."""
    import dataclasses

    from ..download_cache import CATALOG_POLICY, DownloadSettings

    policy = dataclasses.replace(CATALOG_POLICY, timeout=timeout, max_bytes=int(max_mb * 1024 * 1024))
    return DownloadSettings(concurrency=concurrency, retries=retries, policy=policy)


# The model options, declared once; ``model_options`` adds them to a command.
_MODEL_PANEL = "Model"
_MODEL_PARAMS: list[tuple[str, Any, Any]] = [
    (
        "model",
        Annotated[
            str | None,
            typer.Option(
                "--model",
                envvar="CLIPSEARCH_MODEL",
                help="open_clip architecture (ViT-B-32, ViT-B-16, ViT-L-14, ...), hf-hub:ORG/REPO, hf:REPO for "
                "transformers, or OWNER/NAME for a model published as ONNX towers (immich-app/ViT-B-32__openai). "
                "Default: the namespace's model, else ViT-B-32.",
                rich_help_panel=_MODEL_PANEL,
            ),
        ],
        None,
    ),
    (
        "pretrained",
        Annotated[
            str | None,
            typer.Option(
                "--pretrained",
                envvar="CLIPSEARCH_PRETRAINED",
                help="open_clip pretrained tag (default: openai; with --weights FILE, none: the file is recorded as "
                "file:NAME unless you name its tag).",
                rich_help_panel=_MODEL_PANEL,
            ),
        ],
        None,
    ),
    (
        "weights",
        Annotated[
            Path | None,
            typer.Option(
                "--weights",
                envvar="CLIPSEARCH_WEIGHTS",
                help="Local weights: a checkpoint file, or a saved model folder (open_clip, transformers, or ONNX "
                "towers from `clipsearch models export`).",
                rich_help_panel=_MODEL_PANEL,
            ),
        ],
        None,
    ),
    (
        "device",
        Annotated[
            str,
            typer.Option(
                "--device",
                envvar="CLIPSEARCH_DEVICE",
                help="auto, cpu, cuda, cuda:N or mps.",
                rich_help_panel=_MODEL_PANEL,
            ),
        ],
        "auto",
    ),
    (
        "runtime",
        Annotated[
            str | None,
            typer.Option(
                "--runtime",
                envvar="CLIPSEARCH_RUNTIME",
                help="torch, or onnx (ONNX Runtime on the CPU; towers exported once to a cache). Default: the "
                "namespace's, else torch; queries run on the ONNX towers unless torch is asked for.",
                rich_help_panel=_MODEL_PANEL,
            ),
        ],
        None,
    ),
    (
        "precision",
        Annotated[
            str | None,
            typer.Option(
                "--precision",
                envvar="CLIPSEARCH_PRECISION",
                help="fp32, or int8 (ONNX Runtime dynamic quantisation; a separate model identity). fp16 is "
                "automatic on CUDA.",
                rich_help_panel=_MODEL_PANEL,
            ),
        ],
        None,
    ),
    (
        "decode",
        Annotated[
            str | None,
            typer.Option(
                "--decode",
                envvar="CLIPSEARCH_DECODE",
                help="fast (JPEGs decoded at reduced scale, within cosine 0.98 of exact) or exact (full decode, "
                "the reference's pixels). Default: the namespace's, else fast.",
                rich_help_panel=_MODEL_PANEL,
            ),
        ],
        None,
    ),
]


def model_options(fn: F) -> F:
    """Give a command the model options; it receives them as one ``choice: ModelChoice``."""
    hints = typing.get_type_hints(fn, include_extras=True)
    signature = inspect.signature(fn)
    params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()]
    params = [p for p in params if p.name != "choice"]
    params += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, annotation, default in _MODEL_PARAMS
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name, _, _ in _MODEL_PARAMS}
        return fn(*args, choice=ModelChoice(**values), **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper  # type: ignore[return-value]


# -- errors --------------------------------------------------------------------------------------
_FLAGS = {"filters": "--filter", "out": "--out"}  # where a flag is not the argument's name


def flag(param: str) -> str:
    """The command-line flag of a library argument: ``same_filter`` -> ``--same-filter``."""
    return _FLAGS.get(param) or "--" + param.replace("_", "-")


def word(e: ClipsearchError) -> str:
    """A library error as a terminal user reads it."""
    if isinstance(e, NoDatabaseError):
        return f"no database at {e.location}; run `clipsearch ingest` first or pass --db"
    if isinstance(e, NamespaceNotFoundError):
        return f"{e.message}; run `clipsearch ingest` first or pass --namespace"
    return e.worded(flag)


def handle_errors(fn: F) -> F:
    """Turn user-facing errors into one ``error:`` line and their exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ClipsearchError as e:
            err.print(Text.assemble(("error:", "bold red"), " ", word(e)), highlight=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("open_clip").setLevel(logging.ERROR)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    # read by transformers when (if ever) it is imported; importing it here would cost a second
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# -- shared helpers --------------------------------------------------------------------------------
_FILTER_RE = re.compile(r"^\s*([^=<>!~\s]+)\s*(~=|>=|<=|=|>|<)\s*(.*?)\s*$", re.S)
_OPERATOR_NAMES = {">=": "gte", "<=": "lte", ">": "gt", "<": "lt"}


def parse_filters(values: list[str] | None) -> dict[str, Any] | None:
    """``--filter`` values as the library's filters: ``KEY=VALUE`` (repeated: any of them),
    ``KEY~=VALUE`` (the same, ignoring the case of A-Z: ``iexact``) and ``KEY>=VALUE``,
    ``KEY<=``, ``KEY>``, ``KEY<`` (combined: all of them)."""
    if not values:
        return None
    filters: dict[str, Any] = {}
    for v in values:
        m = _FILTER_RE.match(v)
        if not m or not m.group(3):
            raise UsageError(
                f"bad --filter {v!r}: use KEY=VALUE, KEY~=VALUE (any case) or KEY>=VALUE (also <=, >, <), "
                "e.g. --filter label=cat --filter 'taken_at>=2024-06-01'"
            )
        key, op, value = m.groups()
        if op == "=":
            if isinstance(filters.get(key), dict):
                raise UsageError(f"--filter {key}: give either values ({key}=...) or a range ({key}>=...), not both")
            filters.setdefault(key, []).append(value)
        else:
            if isinstance(filters.get(key), list):
                raise UsageError(f"--filter {key}: give either values ({key}=...) or a range ({key}>=...), not both")
            if op == "~=":
                filters.setdefault(key, {}).setdefault("iexact", []).append(value)
            else:
                filters.setdefault(key, {})[_OPERATOR_NAMES[op]] = value
    return filters


def hooks(few_calls: bool = False) -> dict[str, Any]:
    """A Collection's hooks for a terminal: notices on stderr, a spinner while a model loads;
    ``few_calls`` for a command that answers one query and exits."""
    return {"notice": notice, "loading": loading, "few_calls": few_calls}


def notice(message: str) -> None:
    """A library notice on stderr, its arguments named as flags."""
    err.print(message.worded(flag) if isinstance(message, Wording) else message, highlight=False, markup=False)


def loading(what: str):
    """A spinner on a terminal while a model loads; nothing elsewhere."""
    import contextlib

    return err.status(Text(f"loading {what} ..."), spinner="dots") if err.is_terminal else contextlib.nullcontext()


def rate_column() -> Any:
    """A progress column: items per second (rich.progress is imported by ingest only)."""
    from rich.progress import ProgressColumn, Task
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:6.1f} items/s" if speed else "    -- items/s", style="progress.data.speed")

    return RateColumn()


def print_hits(hits: list, as_json: bool) -> None:
    if as_json:
        for h in hits:
            line = {"id": h.id, "score": round(h.score, 6), "path": h.metadata.get("path"), "metadata": h.metadata}
            sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
        return
    if not hits:
        out.print("no results")
        return
    catalog = any("catalog" in h.metadata for h in hits)
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    if catalog:  # products are known by their id and where the image came from
        table.add_column("id", no_wrap=True)
        table.add_column("image", no_wrap=True)
    else:
        table.add_column("path", no_wrap=True)
        table.add_column("label")
    for rank, h in enumerate(hits, 1):
        meta = h.metadata
        if catalog:
            table.add_row(str(rank), f"{h.score:.4f}", h.id, str(meta.get("url") or meta.get("path") or ""))
        else:
            table.add_row(str(rank), f"{h.score:.4f}", str(meta.get("path", h.id)), str(meta.get("label", "")))
    print_table(table)
