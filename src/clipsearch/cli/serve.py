"""``clipsearch serve``: the HTTP API and the web gallery (``clipsearch.server``)."""

from __future__ import annotations

import errno
import signal
import socket
from pathlib import Path
from typing import Annotated

import typer

from ..choice import ModelChoice
from ..errors import ClipsearchError, UsageError
from ..settings import DEFAULT_DB
from ._common import DbOpt, err


def serve(
    db: DbOpt = DEFAULT_DB,
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
    access_log: Annotated[
        bool,
        typer.Option("--access-log/--no-access-log", envvar="CLIPSEARCH_ACCESS_LOG", help="Log every request."),
    ] = False,
    max_request_images_mb: Annotated[
        float,
        typer.Option(
            "--max-request-images-mb",
            envvar="CLIPSEARCH_MAX_REQUEST_IMAGES_MB",
            min=0.001,
            help="What the images of one request (URLs included) may hold together; over it, 413.",
        ),
    ] = 128.0,
    max_url_fetches: Annotated[
        int,
        typer.Option(
            "--max-url-fetches",
            envvar="CLIPSEARCH_MAX_URL_FETCHES",
            min=1,
            help="Image URLs fetched at once, server-wide (8 at most per request).",
        ),
    ] = 32,
    allowed_hosts: Annotated[
        str | None,
        typer.Option(
            "--allowed-hosts",
            envvar="CLIPSEARCH_ALLOWED_HOSTS",
            help="Host names the server answers to, comma-separated ('*': any). Default: localhost, 127.0.0.1, "
            "::1 and --host; with --host 0.0.0.0 or ::, also this machine's names and addresses (any name with "
            "--api-key).",
        ),
    ] = None,
    allowed_origins: Annotated[
        str | None,
        typer.Option(
            "--allowed-origins",
            envvar="CLIPSEARCH_ALLOWED_ORIGINS",
            help="Web origins (https://app.example.com) whose pages may call the API, comma-separated; CORS "
            "headers are sent for them. Other sites' POST/DELETE requests are refused.",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", envvar="CLIPSEARCH_LOG_LEVEL")] = "info",
    watch: Annotated[
        list[Path] | None,
        typer.Option(
            "--watch",
            help="Keep the default namespace in step with this folder while serving (repeatable): new and "
            "changed images are embedded, deleted ones removed, so the gallery stays current.",
        ),
    ] = None,
    served_model_name: Annotated[
        list[str] | None,
        typer.Option(
            "--served-model-name",
            envvar="CLIPSEARCH_SERVED_MODEL_NAME",
            help="A name clients may send as `model` (repeatable, or comma-separated); the first is the name "
            "/health, /v1/models and the answers report.",
        ),
    ] = None,
    *,
    choice: ModelChoice,
) -> None:
    """Run the HTTP API (OpenAI-compatible /v1/embeddings, search, items) and the web gallery."""
    import uvicorn

    from ..collection import Collection
    from ..encoders import load_encoder, runnable_spec
    from ..server import ServerSettings, create_app
    from ..store import open_store, validate_namespace

    validate_namespace(namespace)
    for folder in watch or ():
        if not folder.expanduser().is_dir():
            raise UsageError(f"cannot watch {folder}: no such folder")
    store = open_store(db)
    # the server's model: the flags, else the default namespace's recorded model, else the default
    spec = Collection(store, namespace, choice, owns_store=False).spec
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
        max_request_image_bytes=int(max_request_images_mb * 1024 * 1024),
        max_url_fetches=max_url_fetches,
        allowed_hosts=served_hosts(allowed_hosts, host, api_key),
        allowed_origins=tuple(_split(allowed_origins)),
        watch=tuple(watch or ()),
        served_model_names=tuple(dict.fromkeys(n for value in served_model_name or () for n in _split(value))),
    )
    runnable = runnable_spec(spec, choice.runtime is not None)
    web = create_app(settings, lambda: (load_encoder(runnable, serving=True), spec), store=store)
    config = uvicorn.Config(
        web,
        host=host,
        port=port,
        log_level=log_level.lower(),
        access_log=access_log,
        log_config=_log_config(log_level),
    )
    server = uvicorn.Server(config)
    failure: list[str] = []

    def stop(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    web.state.service.on_load_failure = stop
    # the address is taken before anything says "serving": a port in use is one error line
    sock = _listen(host, port)
    # the model as a person knows it: a weights folder by its name, not the default architecture's
    err.print(f"serving {db} on http://{host}:{port} (docs: /docs); loading {spec.label} ...", highlight=False)
    # uvicorn drains, then raises the signal it caught again: a SIGTERM that only asks for a
    # clean stop (systemd, docker stop) then ends the process with 143; ignored, it ends in 0
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failure:
        raise ClipsearchError(failure[0])


def _log_config(level: str) -> dict:
    """uvicorn's logging, with the library's own loggers (``clipsearch.*``: the model loaded,
    ``--watch`` batches, failures) on the same handler and level; without it they had no
    handler, and Python printed only their warnings."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["clipsearch"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (IPv4 or IPv6), or UsageError saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise UsageError(
            f"cannot listen on {host}: {e.strerror or e}; give an address or host name of this machine"
        ) from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(
                f"cannot listen on {host}:{port}: the port is in use; stop what holds it, or pick another --port"
            ) from None
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def served_hosts(given: str | None, bound: str, api_key: str | None) -> tuple[str, ...]:
    """The Host names served: as given; else the loopback names and the bound address; on every
    interface, this machine's own names and addresses too. Any name only with an API key: a
    server answering every name without one lets any web page read and write it through a name
    of its own that resolves here (DNS rebinding). Other names are a 400 that says to add them."""
    if given is not None:
        return tuple(_split(given)) or ("*",)
    from ..server.service import LOOPBACK_HOSTS

    if bound not in ("0.0.0.0", "::", ""):
        return (*LOOPBACK_HOSTS, bound)
    if api_key:
        return ("*",)
    return tuple(dict.fromkeys([*LOOPBACK_HOSTS, *_own_names()]))


def _own_names() -> list[str]:
    """This machine's host name, its fully qualified name and the addresses they resolve to."""
    import socket

    names = [socket.gethostname(), socket.getfqdn()]
    for name in list(names):
        try:
            names += [info[4][0] for info in socket.getaddrinfo(name, None)]
        except OSError:  # a name that does not resolve here adds no address
            continue
    return [n.lower() for n in names if n]
