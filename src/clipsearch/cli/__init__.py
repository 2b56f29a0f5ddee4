"""The ``clipsearch`` command line: a thin face of ``clipsearch.Collection``.

One module per command group: ``ingest``; ``watch``; ``query`` (search, similar, embed,
duplicates); ``store`` (info, failures, export, db, index); ``evaluate`` (eval zero-shot,
eval retrieval); ``models`` (models export, models list); ``serve``; ``worker``. Options shared by several
commands, the model options among them, are declared once in ``_common``.

Settings come from flags, then ``CLIPSEARCH_*`` environment variables, then the model recorded
for the namespace (so ``search`` uses whatever ``ingest`` used), then the defaults.
Exit codes: 0 success, 1 some items failed, 2 a usage or set-up error, 130 interrupted.
"""

from __future__ import annotations

import re
import sys
from typing import Annotated, Any

import typer

from .. import __version__
from . import evaluate, models, query, serve, store, watch, worker
from . import ingest as ingest_cmd
from ._common import handle_errors, model_options, out, quiet_libraries

app = typer.Typer(
    name="clipsearch",
    help="Self-hosted CLIP embeddings and semantic image search.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
    quiet_libraries()


app.command("ingest")(handle_errors(model_options(ingest_cmd.ingest)))
app.command("search")(handle_errors(model_options(query.search)))
app.command("similar")(handle_errors(query.similar))
app.command("embed")(handle_errors(model_options(query.embed)))
app.command("duplicates")(handle_errors(query.duplicates))
app.command("export")(handle_errors(store.export))
app.command("import")(handle_errors(model_options(store.import_)))
app.command("info")(handle_errors(store.info))
app.command("failures")(handle_errors(store.failures))
app.command("watch")(handle_errors(model_options(watch.watch)))
app.command("serve")(handle_errors(model_options(serve.serve)))

db_app = typer.Typer(help="The store itself: schema version and migrations.", no_args_is_help=True)
index_app = typer.Typer(help="The vector index of a namespace.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(index_app, name="index")
db_app.command("migrate")(handle_errors(store.db_migrate))
index_app.command("build")(handle_errors(store.index_build))
index_app.command("status")(handle_errors(store.index_status))

evaluate.eval_app.command("zero-shot")(handle_errors(model_options(evaluate.zero_shot)))
evaluate.eval_app.command("retrieval")(handle_errors(model_options(evaluate.retrieval)))
app.add_typer(evaluate.eval_app, name="eval")

models.models_app.command("export")(handle_errors(models.export))
models.models_app.command("list")(handle_errors(models.list_models))
app.add_typer(models.models_app, name="models")

worker.worker_app.callback()(handle_errors(model_options(worker.worker)))
worker.worker_app.command("install-trigger")(handle_errors(worker.worker_install_trigger))
app.add_typer(worker.worker_app, name="worker")

# ``--ray`` alone means a local cluster: the next word is its address only if it looks like one.
_RAY_ADDRESS = re.compile(r"^(local|auto|[a-z]+://.*|[\w.-]+:\d+)$")


def _ray_alone_means_local(argv: list[str]) -> list[str]:
    out_argv = []
    for i, arg in enumerate(argv):
        out_argv.append(arg)
        if arg == "--ray" and (i + 1 == len(argv) or not _RAY_ADDRESS.match(argv[i + 1])):
            out_argv[-1] = "--ray=local"
    return out_argv


# ``--recursive=false``: the spelling other tools (and our users' specs) use for a boolean flag
_BOOLEAN_VALUE = re.compile(r"^(--[a-z][a-z0-9-]*)=(true|false|yes|no|on|off|1|0)$", re.I)


def _boolean_flags() -> dict[str, tuple[str | None, str | None]]:
    """Every boolean flag of every command: its name -> (the flag that turns it on, off)."""
    flags: dict[str, tuple[str | None, str | None]] = {}

    def walk(command: Any) -> None:
        for param in command.params:  # Typer's own click: its options are known by their fields
            if getattr(param, "is_flag", False) and not getattr(param, "count", False):
                on, off = param.opts[0], param.secondary_opts[0] if param.secondary_opts else None
                for name in (*param.opts, *param.secondary_opts):
                    flags.setdefault(name, (on, off))
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return flags


def _boolean_values(argv: list[str]) -> list[str]:
    """``--flag=true`` as ``--flag`` and ``--flag=false`` as ``--no-flag`` (or nothing, for a
    flag without an opposite), for the boolean flags only; anything else is left to Typer."""
    if not any(_BOOLEAN_VALUE.match(a) for a in argv):
        return argv  # the common case costs nothing
    flags, out_argv = _boolean_flags(), []
    for i, arg in enumerate(argv):
        m = _BOOLEAN_VALUE.match(arg)
        if m is None or m.group(1) not in flags or "--" in argv[:i]:
            out_argv.append(arg)
            continue
        on, off = flags[m.group(1)]
        wanted = m.group(2).lower() in ("true", "yes", "on", "1")
        if m.group(1) == off:  # --no-recursive=true
            wanted = not wanted
        chosen = on if wanted else off
        if chosen is not None:
            out_argv.append(chosen)
    return out_argv


def main() -> None:
    app(args=_boolean_values(_ray_alone_means_local(sys.argv[1:])), prog_name="clipsearch")


__all__ = ["app", "main"]
