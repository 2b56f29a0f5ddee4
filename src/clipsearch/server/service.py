"""What the HTTP API does, without the HTTP: model loading, batched embedding, search, items.

One ``Service`` owns the store, the encoder (loaded in the background at start-up, then warmed
up), a single model thread that every batch runs on (so text and image batches never fight
for the cores), a small decode pool, and an HTTP client for image URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import numpy as np

from ..collection import Collection
from ..decode_stage import DecodeSettings, decode_crop
from ..errors import ClipsearchError, ImageError, NotFoundError, TooLargeError
from ..fetch import FetchPolicy, load_image_ref
from ..identity import ModelSpec
from ..imaging import DEFAULT_MAX_MEGAPIXELS, DecodedImage
from ..settings import DEFAULT_DB, settings
from ..store import Item, NewItem, Store, validate_namespace
from ..store.base import check_item_id, with_derived
from .batching import MicroBatcher
from .media import Media

if TYPE_CHECKING:
    from ..encoders import Encoder
    from ..watch import Watcher

log = logging.getLogger("clipsearch.server")
R = TypeVar("R")


class StartingError(ClipsearchError):
    """The model is still loading (HTTP 503)."""


class LoadFailedError(ClipsearchError):
    """The model could not be loaded (HTTP 503, with the reason)."""


class ConflictError(ClipsearchError):
    """An item with this id exists and the request did not ask to replace it (HTTP 409)."""

    def __init__(self, item_id: str, namespace: str):
        self.item_id = item_id
        self.namespace = namespace
        super().__init__(
            f"item {item_id!r} already exists in namespace {namespace!r}; add ?replace=true to replace it, "
            "or leave out the id to get a new one"
        )


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # the names of this machine a browser uses


@dataclass
class ServerSettings:
    db: str = DEFAULT_DB
    namespace: str = "default"  # used when a request names none
    api_key: str | None = None
    allow_private_urls: bool = False
    max_request_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    url_timeout: float = 10.0
    max_batch: int = 32  # images per model call
    max_text_batch: int = field(default_factory=lambda: settings().max_text_batch)  # texts per model call
    batch_wait_ms: float = 5.0
    max_inputs: int = 2048
    decode_workers: int = 2
    media_dir: Path | None = None
    # image URLs: fetched at most this many at a time server-wide, and 8 per request; the images
    # of one request may hold at most max_request_image_bytes together (else 413)
    max_url_fetches: int = 32
    max_request_image_bytes: int = 128 * 1024 * 1024
    # Host headers served ("*": any). A page on a hostile domain that resolves to 127.0.0.1 (DNS
    # rebinding) sends its own name: refused.
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    # origins whose browser pages may call the API (CORS headers are sent for them); other
    # cross-origin POST/PUT/PATCH/DELETE requests are refused (cross-site request forgery)
    allowed_origins: tuple[str, ...] = ()
    # folders kept in step with the default namespace while the server runs (watch.Watcher)
    watch: tuple[Path, ...] = ()
    # names the served model answers to in `model` (the first is the one reported), for clients
    # that send the name of the service clipsearch replaces (vLLM's and infinity's option)
    served_model_names: tuple[str, ...] = ()

    @property
    def media_root(self) -> Path:
        if self.media_dir is not None:
            return self.media_dir
        return settings().media_root(self.db)


Loader = Callable[[], "tuple[Encoder, ModelSpec]"]


def labelled(label: str | None, e: ClipsearchError) -> ClipsearchError:
    """The same error, its message prefixed with ``label`` (which input of a request it was)."""
    return e if label is None else type(e)(f"{label}: {e.template}")


MAX_TEXT_CHARS = 100_000  # per text: thousands of times what a text tower reads


def _yield_to_queries() -> None:
    """An image thread runs at a lower priority (Linux: a thread's own nice value): when a query's
    text call, the event loop or a decode needs a core, the scheduler gives it one at once, and
    image batches take every cycle left (they are throughput, the others are latency)."""
    with contextlib.suppress(AttributeError, OSError):  # no per-thread priority here: equal shares
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)


class OverBudgetError(TooLargeError):
    """The images of one request passed its budget: nothing more of that request is worth
    fetching."""


async def gather_in_order(awaitables: Iterable[Awaitable[R]]) -> list[R]:
    """Await all concurrently; if any failed, raise the first failure in input order, so a
    request with several bad inputs always reports the same one. Once the request is over its
    image budget (``OverBudgetError``) the rest are cancelled, fetches in flight included."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        pending: set[asyncio.Future[R]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if not task.cancelled() and isinstance(task.exception(), OverBudgetError):
                    raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()  # a no-op for those done
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return [task.result() for task in tasks]


class ImageBudget:
    """What the images of one request may hold together, and how many of its URLs are fetched
    at once: many large URLs in one request must not hold the server's memory."""

    PER_REQUEST_FETCHES = 8

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.held = 0
        self.slots = asyncio.Semaphore(self.PER_REQUEST_FETCHES)

    def check(self) -> None:
        """OverBudgetError once the request is over its budget: no more fetches for it."""
        if self.held > self.max_bytes:
            self.take(0)

    def take(self, n: int) -> None:
        self.held += n
        if self.held > self.max_bytes:
            raise OverBudgetError(
                f"the images of this request total more than {self.max_bytes / 1024 / 1024:g} MiB (the server's "
                "--max-request-images-mb); send fewer or smaller images per request"
            )


class Service:
    def __init__(self, settings: ServerSettings, store: Store, loader: Loader):
        self.settings = settings
        self.store = store
        self.media = Media(settings.media_root)
        self._loader = loader
        self.encoder: Encoder | None = None
        self.spec: ModelSpec | None = None
        self._collections: dict[str, Collection] = {}
        self._collections_lock = threading.Lock()
        self.status = "starting"
        self.error: str | None = None
        self.on_load_failure: Callable[[str], None] | None = None
        self.started_at = int(time.time())
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipsearch-model")
        # image batches: one at a time on all cores, or (an encoder that can hold a call to one
        # core, PyTorch on the CPU) one per core side by side, which keeps every core busy
        # without two thread teams stalling each other when texts run beside them
        self._cores = os.cpu_count() or 1
        self._image_threads = ThreadPoolExecutor(
            max_workers=self._cores, thread_name_prefix="clipsearch-image", initializer=_yield_to_queries
        )
        # Texts get a thread of their own: a one-text query is milliseconds of work and must not
        # wait for an image batch (a second, on a CPU) to finish. The two towers run side by
        # side (ONNX Runtime sessions and PyTorch modules take calls from several threads).
        self._text_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipsearch-text")
        self._calls_lock = threading.Lock()
        self._running = {"image": 0, "text": 0}  # model calls under way, by kind
        self._decode_pool = ThreadPoolExecutor(
            max_workers=max(1, settings.decode_workers), thread_name_prefix="clipsearch-decode"
        )
        wait = settings.batch_wait_ms / 1000.0
        self.text_batcher: MicroBatcher[str, tuple[np.ndarray, int]] = MicroBatcher(
            self._embed_text_batch, self._text_thread, settings.max_text_batch, wait
        )
        self.image_batcher: MicroBatcher[np.ndarray, np.ndarray] = MicroBatcher(
            self._embed_crop_batch, self._image_threads, settings.max_batch, wait
        )
        self.fetch_policy = FetchPolicy(
            allow_private=settings.allow_private_urls,
            timeout=settings.url_timeout,
            max_bytes=settings.max_image_bytes,
        )
        self._http: httpx.AsyncClient | None = None
        self._load_task: asyncio.Task | None = None
        self._fetches = asyncio.Semaphore(max(1, settings.max_url_fetches))
        self._watcher: Watcher | None = None
        self._watch_thread: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self.text_batcher.start()
        self.image_batcher.start()
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.settings.url_timeout), trust_env=False)
        self._load_task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            encoder, spec = await loop.run_in_executor(self._model_thread, self._load_and_warm)
        except ClipsearchError as e:
            self._fail(e.message)
        except Exception as e:
            log.exception("loading the model failed")
            self._fail(f"loading the model failed: {type(e).__name__}: {e}")
        else:
            self.encoder, self.spec = encoder, spec
            if encoder.can_share_cores:
                self.image_batcher.concurrency = self._cores
            self.status = "healthy"
            log.info("model %s ready on %s", encoder.model_id, getattr(encoder, "device", "cpu"))
            if self.settings.watch:
                self._start_watching(encoder, spec)

    def _start_watching(self, encoder: Encoder, spec: ModelSpec) -> None:
        """``serve --watch``: a thread that keeps the default namespace in step with the folders,
        through its own store connection and the server's model."""
        from ..collection import Collection
        from ..pipeline import IngestOptions
        from ..store import open_store
        from ..watch import Watcher, describe

        collection = Collection(
            open_store(self.settings.db), self.settings.namespace, encoder=encoder, spec=spec, db=self.settings.db
        )
        self._watcher = Watcher(
            collection,
            self.settings.watch,
            on_event=lambda event: log.info("watch: %s", describe(event)),
            options=IngestOptions(max_megapixels=self.settings.max_megapixels),
        )

        def run() -> None:
            try:
                self._watcher.run()
            except Exception as e:  # the server goes on serving; the log says why watching stopped
                log.exception("watching %s stopped: %s", ", ".join(map(str, self.settings.watch)), e)
            finally:
                collection.close()

        self._watch_thread = threading.Thread(target=run, name="clipsearch-watch", daemon=True)
        self._watch_thread.start()

    def _fail(self, message: str) -> None:
        self.status, self.error = "failed", message
        if self.on_load_failure:
            self.on_load_failure(message)

    def _load_and_warm(self) -> tuple[Encoder, ModelSpec]:
        # the vectors are read in beside the model's loading (the text thread has nothing to do yet)
        resident = self._text_thread.submit(self._keep_vectors_resident)
        encoder, spec = self._loader()
        for note in encoder.notes:
            log.warning("%s", note)
        # The first call through a model allocates and picks kernels; do it before any client waits.
        encoder.embed_texts(["warm up"])
        h, w = encoder.preprocess_spec.size
        encoder.embed_crops(np.zeros((1, h, w, 3), dtype=np.uint8))
        resident.result()
        return encoder, spec

    def _keep_vectors_resident(self) -> None:
        """``CLIPSEARCH_LOCK_VECTORS``: the default namespace's index is read and its vectors
        locked in memory before the server says it is healthy (another namespace's when it is
        first searched); a MemoryLockError fails the start as a model that cannot load does."""
        if not self.store.index_settings.lock_vectors:
            return
        with contextlib.suppress(NotFoundError):  # no such namespace yet: locked once searched
            self.store.keep_resident(self.settings.namespace)

    async def close(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self._watcher is not None:
            self._watcher.stop()  # the batch in flight is finished and stored
            await asyncio.get_running_loop().run_in_executor(None, self._watch_thread.join, 60)
        await self.text_batcher.stop()
        await self.image_batcher.stop()
        if self._http is not None:
            await self._http.aclose()
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        self._text_thread.shutdown(wait=False, cancel_futures=True)
        self._image_threads.shutdown(wait=False, cancel_futures=True)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    def ready_encoder(self) -> Encoder:
        if self.encoder is not None:
            return self.encoder
        if self.status == "failed":
            raise LoadFailedError(f"the model could not be loaded: {self.error}")
        raise StartingError("the model is still loading; retry in a few seconds")

    @property
    def model_id(self) -> str | None:
        """The name the served model is reported under: the first --served-model-name, else its id."""
        if self.encoder is None:
            return None
        return self.settings.served_model_names[0] if self.settings.served_model_names else self.encoder.model_id

    def accepted_models(self) -> set[str]:
        """Every name a request may give in ``model``: the configured ones, the model's id and
        name, and the public names its identity proves (``ModelIdentity.public_names``)."""
        encoder = self.ready_encoder()
        identity = encoder.identity
        return {*self.settings.served_model_names, encoder.model_id, identity.model, *identity.public_names()}

    @property
    def device(self) -> str | None:
        if self.encoder is None:
            return None
        return str(getattr(self.encoder, "device", "cpu"))

    # -- embedding -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _model_call(self, kind: str) -> Iterator[Encoder]:
        """The encoder for one call of ``kind``, on all cores when it is the only call under
        way, else on one (``Encoder.share_cores``)."""
        encoder = self.encoder
        assert encoder is not None
        with self._calls_lock:
            others = sum(self._running.values())
            self._running[kind] += 1
        try:
            encoder.share_cores(others > 0)
            yield encoder
        finally:
            with self._calls_lock:
                self._running[kind] -= 1

    def _embed_text_batch(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        with self._model_call("text") as encoder:
            vectors, counts = encoder.embed_texts_counted(texts)
        return list(zip(vectors, counts, strict=True))

    def _embed_crop_batch(self, pixels: list[np.ndarray]) -> np.ndarray:
        with self._model_call("image") as encoder:
            return encoder.embed_crops(np.stack(pixels))

    async def embed_texts(self, texts: list[str], labels: list[str] | None = None) -> tuple[np.ndarray, int]:
        """Vectors for ``texts`` and the tokens they occupied, from one tokenisation. A text
        longer than ``MAX_TEXT_CHARS`` is refused (413); a shorter one costs only its first
        tokens (``tokenizer.bounded_text``), however long it is."""
        for i, text in enumerate(texts):
            if len(text) > MAX_TEXT_CHARS:
                what = labels[i] if labels else "a text"
                raise TooLargeError(
                    f"{what} is {len(text):,} characters; a text may be at most {MAX_TEXT_CHARS:,} "
                    "(the model reads only its first few dozen words)"
                )
        encoder = self.ready_encoder()
        results = await self.text_batcher.submit(texts)
        if not results:
            return np.zeros((0, encoder.dim), np.float32), 0
        return np.stack([v for v, _ in results]), sum(n for _, n in results)

    def _decode(self, data: bytes) -> tuple[DecodedImage, np.ndarray]:
        encoder = self.ready_encoder()
        return decode_crop(data, DecodeSettings.for_encoder(encoder, self.settings.max_megapixels))

    def _prepare(self, data: bytes, label: str | None = None) -> np.ndarray:
        try:
            return self._decode(data)[1]
        except ImageError as e:
            raise labelled(label, e) from None

    async def embed_images(self, images: list[bytes], labels: list[str] | None = None) -> np.ndarray:
        """Decode in the decode pool (in parallel with whatever the model is doing), then batch.
        A decode error names its image's label (e.g. ``input[3]``) when labels are given."""
        self.ready_encoder()
        loop = asyncio.get_running_loop()
        names = labels or [None] * len(images)
        pixels = await gather_in_order(
            loop.run_in_executor(self._decode_pool, self._prepare, data, name)
            for data, name in zip(images, names, strict=True)
        )
        return np.stack(await self.image_batcher.submit(pixels))

    async def image_bytes(self, ref: str, budget: ImageBudget | None = None) -> bytes:
        """An image's bytes from a URL, a data URI or base64. URL fetches wait for a slot (server
        wide, and the request's own), and ``budget`` counts what one request holds."""
        assert self._http is not None
        if budget is None:
            budget = ImageBudget(self.settings.max_request_image_bytes)
        async with budget.slots, self._fetches:
            budget.check()  # the request went over while this one waited for a slot
            # counted as the bytes arrive: the request's fetches together never hold more
            return await load_image_ref(self._http, ref, self.fetch_policy, budget.take)

    # -- store access (blocking calls run in worker threads) ---------------------------------
    @staticmethod
    async def run(fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.to_thread(fn, *args)

    def namespace_name(self, namespace: str | None) -> str:
        return validate_namespace(namespace or self.settings.namespace)

    def collection(self, namespace: str) -> Collection:
        """The namespace as a ``Collection`` over the server's store and its loaded model: every
        search, its rules and the model check are the Collection's, as for the command line and
        the library. Kept per namespace once the model is loaded; before that (a vector search
        while the model loads) a collection without a model, which nothing asks to embed (the
        routes that embed wait for ``ready_encoder`` first)."""
        validate_namespace(namespace)
        if self.encoder is None:
            return Collection(self.store, namespace, owns_store=False, db=self.settings.db)
        with self._collections_lock:
            found = self._collections.get(namespace)
            if found is None:
                found = Collection(
                    self.store, namespace, owns_store=False, db=self.settings.db, encoder=self.encoder, spec=self.spec
                )
                self._collections[namespace] = found
            return found

    def get_item(self, namespace: str, item_id: str) -> Item:
        return self.collection(namespace).item(item_id)

    async def add_item(
        self,
        namespace: str,
        data: bytes,
        filename: str | None,
        metadata: dict[str, Any],
        item_id: str | None,
        replace: bool = False,
    ) -> Item:
        encoder = self.ready_encoder()
        assert self.spec is not None
        if item_id is not None:
            check_item_id(item_id)
        item_id = item_id or uuid.uuid4().hex
        known = await self.run(self.store.identity, namespace) is not None
        existing = await self.run(self.store.get_items, namespace, [item_id]) if known else []
        if existing and not replace:
            raise ConflictError(item_id, namespace)
        loop = asyncio.get_running_loop()

        decoded, pixels = await loop.run_in_executor(self._decode_pool, self._decode, data)
        await self.run(self.store.bind_namespace, namespace, encoder.identity, self.spec.to_dict())
        vector = (await self.image_batcher.submit([pixels]))[0]
        digest = hashlib.sha256(data).hexdigest()
        path = await self.run(self.media.save_upload, namespace, item_id, decoded.format, data)
        upload = {"type": "image", "source": "upload", "filename": filename or path.name, "path": str(path)}
        meta = with_derived(
            {**metadata, **upload},
            namespace=namespace,
            width=decoded.width,
            height=decoded.height,
            sha256=digest,
            size=len(data),
            photo=decoded.photo,
        )
        new = NewItem(item_id, meta, sha256=digest, size=len(data), mtime_ns=None)
        await self.run(self.store.write_batch, namespace, [new], vector[None, :])
        old_path = existing[0].metadata.get("path") if existing else None
        if old_path and old_path != str(path) and self.media.is_upload(namespace, item_id, old_path):
            # a replaced upload in another format: its old original must not stay behind
            await self.run(self.media.remove_upload, namespace, item_id, old_path)
        return (await self.run(self.store.get_items, namespace, [item_id]))[0]

    def delete_item(self, namespace: str, item_id: str) -> str | None:
        """Delete the item and its uploaded original; None if the file went too, else why not."""
        item = self.get_item(namespace, item_id)
        self.store.delete_items(namespace, [item_id])
        return self.media.remove_upload(namespace, item_id, item.metadata.get("path"))

    def thumbnail(self, namespace: str, item_id: str, size: int) -> bytes:
        return self.media.thumbnail(self.get_item(namespace, item_id), size)

    def original(self, namespace: str, item_id: str) -> Path:
        return self.media.original(self.get_item(namespace, item_id))

    def total_items(self) -> int:
        return sum(ns.items for ns in self.store.namespaces())
