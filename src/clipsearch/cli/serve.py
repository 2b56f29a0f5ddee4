"""``clipsearch serve``: the HTTP API and the web gallery (``clipsearch.server``)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..collection import Collection, ModelChoice
from ..errors import ClipsearchError
from ..store import open_store, validate_namespace
from ._common import DbOpt, err


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
    log_level: Annotated[str, typer.Option("--log-level", envvar="CLIPSEARCH_LOG_LEVEL")] = "info",
    *,
    choice: ModelChoice,
) -> None:
    """Run the HTTP API (OpenAI-compatible /v1/embeddings, search, items) and the web gallery."""
    import uvicorn

    from ..encoders import load_encoder
    from ..server import ServerSettings, create_app

    validate_namespace(namespace)
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
