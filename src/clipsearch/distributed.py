"""Ingest on a Ray cluster: ``RayExecutor``, the executor that ``pipeline.Ingestor.run`` hands
the claimed items to instead of running them in this process. Selection, skip checks, claims,
the index and the report are the frame's, shared with local ingest; decoding and the encoder
are the same code, spread over Ray Data:

    rows -> fetch + read + decode + crop (tasks, CPU nodes)
         -> embed (an actor pool, the model loaded once per actor; GPU nodes with --gpus-per-actor)
         -> write

Writing goes to the configured store. PostgreSQL: each write actor upserts its batches itself
(the database takes concurrent writers). SQLite: a file has one writer, so the batches come back
to the driver, which commits each one as it arrives; a killed job loses at most the batches not
yet committed, and the next run skips everything that was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from .decode_stage import DecodeSettings, Unchanged, decode_item, failure_reason
from .download_cache import DownloadCache, DownloadSettings, download_all
from .errors import MissingExtraError, UsageError
from .identity import ModelSpec
from .pipeline import Advance, Candidates, Ingestor, IngestReport, failure_record, item_row
from .settings import Settings
from .sources import SourceItem
from .store import FailureRecord, NewItem, is_postgres_url

if TYPE_CHECKING:
    from .encoders import Encoder

NODE_CACHE = Settings.user_cache() / "downloads"


@dataclass
class RayOptions:
    address: str = "local"  # local (a cluster started for this run), auto, or ray://host:10001
    actors: int = 1  # encoder actors
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0  # Ray sets the actor's thread count (OMP_NUM_THREADS) from this
    decode_cpus: float = 1.0  # per decode task
    verbose: bool = False  # Ray's own log on the terminal (else in a file, see ``connect``)


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingExtraError("ingest on Ray", "ray") from None
    return ray


def ray_log_file() -> Path:
    return Settings.user_cache() / "ray.log"


def _quiet(ray: Any) -> None:
    """Ray's own log (cluster start, Ray Data's plan and progress) to ``ray_log_file()`` instead
    of the terminal, where our progress bar and summary are what a user reads."""
    import logging

    path = ray_log_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("ray", "ray.data", "ray.util", "ray._private"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if hasattr(context, "print_on_execution_start"):
        context.print_on_execution_start = False


def connect(address: str, verbose: bool = False) -> Any:
    ray = _ray()
    if not verbose:
        _quiet(ray)
    if ray.is_initialized():
        return ray
    address = (address or "local").strip()
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UsageError(f"cannot reach the Ray cluster at {address!r}: {str(e).splitlines()[0]}") from None
    return ray


# -- rows: what travels between the stages ---------------------------------------------------
def _row(item: SourceItem, known_sha: str | None) -> dict[str, Any]:
    return {
        "id": item.id,
        "source": item.source,
        "path": str(item.path) if item.path is not None else "",
        "url": item.url or "",
        "error": item.error or "",
        "known_sha": known_sha or "",
        "item": item,  # the whole item, pickled: metadata, text, fingerprint, file state
    }


class _Decode:
    """Ray Data stage (a task per batch): fetch URLs (into the node's download cache), read,
    hash, decode and crop, exactly as local ingest's decode workers do."""

    def __init__(self, settings: DecodeSettings, download: DownloadSettings, offline: bool, retry_failed: bool):
        self.settings = settings
        self.download = download
        self.offline = offline
        self.retry_failed = retry_failed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        items: list[SourceItem] = list(batch["item"])
        errors = [str(e) or None for e in batch["error"]]
        self._fetch(items, errors)
        h, w = self.settings.spec.size
        crops = np.zeros((len(items), h, w, 3), np.uint8)
        out: dict[str, list[Any]] = {
            "kind": [], "sha256": [], "size": [], "width": [], "height": [], "photo": [], "reason": []
        }  # fmt: skip
        for i, (item, known) in enumerate(zip(items, batch["known_sha"], strict=True)):
            kind, sha, size, width, height, photo, reason = "failed", "", 0, 0, 0, "{}", errors[i] or ""
            if not reason:
                try:
                    result = decode_item(item, str(known) or None, self.settings)
                except Exception as e:  # one bad file must never stop the run
                    reason = failure_reason(e)
                else:
                    sha, size = result.sha256, result.size
                    if isinstance(result, Unchanged):
                        kind = "unchanged"
                    else:
                        kind, width, height = "new", result.width, result.height
                        photo = json.dumps(result.photo)  # a JSON column: Arrow has no open-ended dicts
                        crops[i] = result.crop
            for key, value in zip(out, (kind, sha, size, width, height, photo, reason), strict=True):
                out[key].append(value)
        return {"item": items, "crop": crops, **{k: np.asarray(v) for k, v in out.items()}}

    def _fetch(self, items: list[SourceItem], errors: list[str | None]) -> None:
        urls = [i for i, it in enumerate(items) if it.url and errors[i] is None]
        if not urls:
            return
        cache = DownloadCache(NODE_CACHE)
        try:
            results = download_all(
                cache, [items[i].url or "" for i in urls], self.download, self.offline, self.retry_failed
            )
        finally:
            cache.close()
        for i, result in zip(urls, results, strict=True):
            if result.path is not None:
                items[i].downloaded_to(result.path)
            else:
                errors[i] = result.error


class _Embed:
    """Ray Data stage (an actor pool): the encoder, loaded once per actor."""

    def __init__(self, spec: dict[str, Any], device: str, embed_text: bool):
        from .encoders import load_encoder

        self.encoder: Encoder = load_encoder(ModelSpec.from_dict(spec, device))
        self.embed_text = embed_text

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        kinds = batch["kind"]
        new = np.flatnonzero(kinds == "new")
        vectors = np.zeros((len(kinds), self.encoder.dim), np.float32)
        if len(new):
            vectors[new] = self.encoder.embed_crops(np.ascontiguousarray(batch["crop"][new]))
        text_vectors = np.zeros_like(vectors)
        has_text = np.zeros(len(kinds), bool)
        if self.embed_text:
            items = batch["item"]
            todo = [i for i in range(len(kinds)) if kinds[i] != "failed" and items[i].text]
            if todo:
                text_vectors[todo] = self.encoder.embed_texts([items[i].text for i in todo])
                has_text[todo] = True
        batch = {k: v for k, v in batch.items() if k != "crop"}  # the pixels are done with
        return {**batch, "vector": vectors, "text_vector": text_vectors, "has_text": has_text}


def _records(
    batch: dict[str, Any], namespace: str
) -> tuple[list[NewItem], np.ndarray, list[FailureRecord], list[NewItem]]:
    """A result batch as the store's write_batch arguments."""
    items, vectors, failures, touched = [], [], [], []
    for i, item in enumerate(batch["item"]):
        kind = batch["kind"][i]
        text_vector = batch["text_vector"][i] if batch["has_text"][i] else None
        if kind == "failed":
            failures.append(failure_record(item, str(batch["reason"][i])))
            continue
        sha, size = str(batch["sha256"][i]), int(batch["size"][i])
        if kind == "unchanged":
            touched.append(item_row(item, sha, size, text_vector=text_vector))
            continue
        decoded = SimpleNamespace(
            width=batch["width"][i], height=batch["height"][i], photo=json.loads(str(batch["photo"][i]))
        )
        items.append(item_row(item, sha, size, namespace=namespace, size_wh=decoded, text_vector=text_vector))
        vectors.append(batch["vector"][i])
    matrix = np.stack(vectors) if vectors else np.zeros((0, batch["vector"].shape[1]), np.float32)
    return items, matrix, failures, touched


class _PostgresWriter:
    """Ray Data stage (an actor pool): upserts result batches into PostgreSQL directly."""

    def __init__(self, url: str, namespace: str):
        from .store.postgres import PostgresStore

        self.store = PostgresStore(url)
        self.namespace = namespace

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        items, vectors, failures, touched = _records(batch, self.namespace)
        self.store.write_batch(self.namespace, items, vectors, failures, touched)
        return _counts(items, failures, touched)


def _counts(items: list, failures: list[FailureRecord], touched: list) -> dict[str, Any]:
    return {
        "embedded": np.asarray([len(items)]),
        "failed": np.asarray([len(failures)]),
        "unchanged": np.asarray([len(touched)]),
        "failures": np.asarray([[(f.id, f.source, f.reason) for f in failures]], dtype=object),
    }


# -- the executor -------------------------------------------------------------------------
class RayExecutor:
    """Decode, embed and write on a Ray cluster; ``pipeline.Ingestor.run`` does the rest, as for
    a local ingest. ``db``: where the workers write (PostgreSQL), or the driver does (SQLite)."""

    def __init__(self, options: RayOptions, db: str):
        self.options = options
        self.db = db
        self.ray: Any = None

    def start(self, ingestor: Ingestor) -> None:
        # before the frame's clock: the report times the work, not starting a cluster
        self.ray = connect(self.options.address, self.options.verbose)

    def execute(self, ingestor: Ingestor, candidates: Candidates, report: IngestReport, advance: Advance) -> None:
        options = ingestor.options
        # claimed up front: the driver hands the whole list to Ray Data
        todo = list(candidates)
        if options.limit is not None:
            todo = todo[: options.limit]
        if not todo:
            return
        ray, namespace = self.ray, ingestor.namespace
        rows = [_row(item, known.sha256 if known else None) for item, known in todo]
        blocks = max(1, min(len(rows) // max(1, options.batch_size), 200))
        decoded = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            _Decode,
            fn_constructor_kwargs={
                "settings": ingestor.decode, "download": options.download, "offline": options.offline,
                "retry_failed": options.retry_failed,
            },
            batch_size=options.batch_size,
            batch_format="numpy",
            num_cpus=self.options.decode_cpus,
            concurrency=(1, max(1, int(ray.cluster_resources().get("CPU", 1)))),
        )  # fmt: skip
        device = "cuda" if self.options.gpus_per_actor > 0 else "cpu"
        embedded = decoded.map_batches(
            _Embed,
            fn_constructor_kwargs={
                "spec": ingestor.model_spec.to_dict(), "device": device, "embed_text": options.embed_text
            },
            batch_size=options.batch_size,
            batch_format="numpy",
            concurrency=self.options.actors,
            num_cpus=self.options.cpus_per_actor,
            num_gpus=self.options.gpus_per_actor or None,
        )  # fmt: skip
        if is_postgres_url(self.db):
            written = embedded.map_batches(
                _PostgresWriter,
                fn_constructor_kwargs={"url": self.db, "namespace": namespace},
                batch_size=options.batch_size,
                batch_format="numpy",
                concurrency=max(1, self.options.actors),
            )
            for counts in written.iter_batches(batch_size=1, batch_format="numpy"):
                _tally(report, counts, advance)
            return
        for batch in embedded.iter_batches(batch_size=options.batch_size, batch_format="numpy"):
            items, vectors, failures, touched = _records(batch, namespace)
            ingestor.store.write_batch(namespace, items, vectors, failures, touched)
            _tally(report, _counts(items, failures, touched), advance)


def _tally(report: IngestReport, counts: dict[str, Any], advance: Advance) -> None:
    for embedded, failed, unchanged, failures in zip(
        counts["embedded"], counts["failed"], counts["unchanged"], counts["failures"], strict=True
    ):
        report.embedded += int(embedded)
        report.failed += int(failed)
        report.skipped += int(unchanged)
        report.failures.extend(FailureRecord(i, s, r) for i, s, r in failures)
        advance(int(embedded) + int(failed) + int(unchanged))
