"""``models export`` and ``models list``: model folders that run without torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..choice import ModelChoice
from ._common import JsonOpt, err, out, print_table

models_app = typer.Typer(help="Models as ONNX folders you can move: export and list.", no_args_is_help=True)


def export(
    model: Annotated[
        str | None,
        typer.Argument(
            help="open_clip architecture (ViT-B-32, ...), hf-hub:ORG/REPO, or a published ONNX repository "
            "(immich-app/ViT-B-32__openai). Default: ViT-B-32."
        ),
    ] = None,
    pretrained: Annotated[
        str | None, typer.Option("--pretrained", help="open_clip pretrained tag (default: openai).")
    ] = None,
    weights: Annotated[
        Path | None, typer.Option("--weights", help="Local weights: a checkpoint file or a model folder.")
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Write the folder here (new or empty); without it, the export stays in the cache."),
    ] = None,
    int8: Annotated[bool, typer.Option("--int8/--no-int8", help="Also write the int8 image tower.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Export a model's image and text towers to ONNX (Immich's layout), fp32 and int8.

    The folder runs without torch wherever it is copied: --weights DIR in any command. Exporting
    an open_clip checkpoint needs the torch extra."""
    from .. import models as lib

    spec = ModelChoice(model, pretrained, weights).resolve(None)
    notice = (lambda line: err.print(line, highlight=False)) if not as_json else None
    folder = lib.export(spec, out_dir, int8=int8, notice=notice)
    if as_json:
        sys.stdout.write(json.dumps(folder.as_dict()) + "\n")
        return
    out.print(f"{folder.identity.describe()}: {folder.folder}", highlight=False)
    out.print(f"run it without torch: clipsearch ingest PHOTOS --weights {folder.folder}", highlight=False)


def list_models(as_json: JsonOpt = False) -> None:
    """Models cached as ONNX towers: exports, and repositories from the Hugging Face hub."""
    from .. import models as lib

    folders = lib.cached()
    if as_json:
        for f in folders:
            sys.stdout.write(json.dumps(f.as_dict()) + "\n")
        return
    if not folders:
        out.print("no models cached; `clipsearch models export MODEL` makes one")
        return
    table = Table(show_edge=False, pad_edge=False)
    for col in ("model", "dim", "int8", "size", "source", "folder"):
        table.add_column(col, no_wrap=col == "folder")
    for f in folders:
        size = f"{f.size_bytes / 1e6:.0f} MB" if f.size_bytes >= 1e6 else f"{f.size_bytes / 1e3:.0f} kB"
        table.add_row(
            f"{f.identity.backend} {f.identity.model_id}",
            str(f.identity.dim),
            "yes" if f.int8 else "no",
            size,
            f.source,
            str(f.folder),
        )
    print_table(table)
