"""``clipsearch eval zero-shot`` and ``eval retrieval``: how well a model (and a runtime, a
precision, a decode mode) does on the user's own images, several configurations side by side."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..choice import ModelChoice
from ..errors import UsageError
from ._common import JsonOpt, err, hooks, out, print_table
from .ingest import progress_bar

if TYPE_CHECKING:
    from ..collection import Collection
    from ..pipeline import IngestOptions

eval_app = typer.Typer(
    help="Measure a model on your own images: zero-shot accuracy, retrieval recall.", no_args_is_help=True
)


def _options(batch_size: int) -> IngestOptions:
    from ..pipeline import IngestOptions

    return IngestOptions(batch_size=batch_size)


EvalDbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Keep the images' vectors in this store (a re-run embeds nothing again); default: a temporary one.",
    ),
]
CompareOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--compare",
        help="Another configuration to score beside the first, e.g. 'runtime=onnx,precision=int8' or "
        "'decode=exact' or 'model=ViT-B-16' (keys: model, pretrained, weights, device, runtime, precision, "
        "decode); repeatable.",
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, envvar="CLIPSEARCH_BATCH_SIZE")]
_KEYS = ("model", "pretrained", "weights", "device", "runtime", "precision", "decode")


def _choices(base: ModelChoice, compare: list[str] | None) -> list[ModelChoice]:
    choices = [base]
    for spec in compare or ():
        changes: dict[str, Any] = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in _KEYS or not value.strip():
                raise UsageError(f"bad --compare {spec!r}: use KEY=VALUE[,KEY=VALUE] with keys {', '.join(_KEYS)}")
            changes[key] = value.strip()
        if {"model", "weights"} & set(changes) and "pretrained" not in changes:
            changes["pretrained"] = None  # another model: its own default tag
        choices.append(dataclasses.replace(base, **changes))
    return choices


@contextlib.contextmanager
def _collections(db: str | None, namespace: str, choices: list[ModelChoice]) -> Iterator[list[Collection]]:
    """One collection per configuration, each its own namespace (a runtime's vectors must not be
    reused for another's score), in ``db`` or a temporary store."""
    from ..collection import Collection
    from ..store import open_store, validate_namespace

    with contextlib.ExitStack() as stack:
        if db is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="clipsearch-eval-"))
            db = str(Path(folder) / "eval.db")
        collections = []
        for i, choice in enumerate(choices):
            name = namespace if len(choices) == 1 else f"{namespace}.{i + 1}"
            collection = stack.enter_context(
                Collection(open_store(db), validate_namespace(name), choice, db=db, **hooks())
            )
            collections.append(collection)
        yield collections


def _advance(bar: Any, task: Any, done: int, total: int) -> None:
    bar.update(task, completed=done, total=total)


def _score_each(
    db: str | None, namespace: str, choices: list[ModelChoice], as_json: bool, score: Callable[..., Any]
) -> list[Any]:
    """``score(collection, progress=...)`` for each configuration, with a progress bar on a
    terminal; with ``as_json`` each report is printed as one JSON line as soon as it is made."""
    reports = []
    with _collections(db, namespace, choices) as collections:
        for collection in collections:
            if err.is_terminal and not as_json:
                with progress_bar() as bar:
                    task = bar.add_task("ingest", total=None)
                    report = score(collection, progress=functools.partial(_advance, bar, task))
            else:
                report = score(collection, progress=None)
            reports.append(report)
            if as_json:
                out.print(json.dumps(report.as_dict()), highlight=False, soft_wrap=True)
    return reports


def _print_scores(title: str, columns: list[str], reports: list[Any], cells: Callable[[Any], list[str]]) -> None:
    """One row per configuration: its label, ``cells(report)`` under ``columns``, its speed."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("configuration")
    for col in [*columns, "images/s"]:
        table.add_column(col, justify="right")
    for r in reports:
        label = f"{r.model} {r.config['runtime']}/{r.config['precision']}/{r.config['decode']}"
        rate = f"{r.images_per_second:.1f}" if r.embedded else "(stored)"  # nothing was embedded this run
        table.add_row(label, *cells(r), rate)
    print_table(table)


def zero_shot(
    dataset: Annotated[
        str,
        typer.Argument(metavar="DATASET", help="A folder of class subfolders, or image-list:FILE with a label column."),
    ],
    template: Annotated[
        list[str] | None,
        typer.Option(
            "--template",
            help="A prompt with {} for the class name (repeatable); default: OpenAI's 80 ImageNet templates.",
        ),
    ] = None,
    compare: CompareOpt = None,
    db: EvalDbOpt = None,
    namespace: Annotated[str, typer.Option("--namespace", "-n")] = "eval",
    batch_size: BatchOpt = 32,
    as_json: JsonOpt = False,
    *,
    choice: ModelChoice,
) -> None:
    """Zero-shot classification: top-1, top-5 and per-class accuracy of the model on DATASET, the
    class names taken from the folder names or labels ('_' read as a space)."""
    from .. import evaluate

    reports = _score_each(
        db,
        namespace,
        _choices(choice, compare),
        as_json,
        lambda c, progress: evaluate.zero_shot(
            c, dataset, templates=template, progress=progress, options=_options(batch_size)
        ),
    )
    if as_json:
        return
    from rich.table import Table

    _print_scores(
        f"zero-shot on {dataset}: {reports[0].n} images, {len(reports[0].classes)} classes",
        ["top-1", "top-5", "failed"],
        reports,
        lambda r: [f"{r.top1:.2%}", f"{r.top5:.2%}", str(r.failed)],
    )
    per_class = Table(title="top-1 per class")
    per_class.add_column("class")
    for i, _ in enumerate(reports):
        per_class.add_column(f"#{i + 1}" if len(reports) > 1 else "top-1", justify="right")
    for name in reports[0].classes:
        per_class.add_row(name, *(f"{r.per_class[name]:.2%}" if name in r.per_class else "-" for r in reports))
    print_table(per_class)


def retrieval(
    dataset: Annotated[
        str, typer.Argument(metavar="CATALOG", help="catalog:FILE with an image column and a caption column.")
    ],
    text_column: Annotated[str, typer.Option("--text-column", help="The caption column.")] = "caption",
    image_column: Annotated[str | None, typer.Option("--image-column", help="The image column.")] = None,
    id_column: Annotated[
        str | None, typer.Option("--id-column", help="The row id column; without it, rows are numbered.")
    ] = None,
    compare: CompareOpt = None,
    db: EvalDbOpt = None,
    namespace: Annotated[str, typer.Option("--namespace", "-n")] = "eval",
    batch_size: BatchOpt = 32,
    as_json: JsonOpt = False,
    *,
    choice: ModelChoice,
) -> None:
    """Captioned-image retrieval: text→image and image→text Recall@1/5/10 (rows naming the same
    image give it several captions)."""
    from .. import evaluate
    from ..catalog import CatalogOptions

    catalog = CatalogOptions(id_column=id_column, image_column=image_column, text_columns=[text_column])
    reports = _score_each(
        db,
        namespace,
        _choices(choice, compare),
        as_json,
        lambda c, progress: evaluate.retrieval(
            c, dataset, catalog=catalog, progress=progress, options=_options(batch_size)
        ),
    )
    if as_json:
        return
    first = reports[0]
    _print_scores(
        f"retrieval on {dataset}: {first.images} images, {first.captions} captions",
        ["text→image R@1", "R@5", "R@10", "image→text R@1", "R@5", "R@10"],
        reports,
        lambda r: [f"{r.text_to_image[k]:.2%}" for k in (1, 5, 10)] + [f"{r.image_to_text[k]:.2%}" for k in (1, 5, 10)],
    )
