"""The collection: one namespace of a store, bound to the model that made its vectors. This is
the library's API; the CLI, the HTTP server, the table worker and Ray ingest are callers of it.

A collection owns two rules for every caller:

- **which model**: the arguments given, else the model recorded for the namespace (so a search
  uses whatever ingest used), else the default (``ViT-B-32`` / ``openai``);
- **the model guard**: a namespace's vectors are never searched with, or mixed with, vectors of
  another model (``ModelMismatchError``).

It loads only what a call needs. Opening one, ``info``, ``failures``, ``similar``,
``duplicates``, ``export`` and keyword search never import torch. A text query loads only the
text tower and an image query only the image tower, as ONNX Runtime sessions over a one-time
export of the model (``encoders.towers``), with a tokenizer and preprocessing that need no torch;
ingest and anything that asks for ``--runtime torch`` or a GPU load the PyTorch model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .choice import ModelChoice
from .errors import (
    ImageError,
    ItemNotFoundError,
    ModelMismatchError,
    NamespaceNotFoundError,
    NoDatabaseError,
    UsageError,
    option,
)
from .identity import ModelIdentity, ModelSpec, known_differences
from .settings import Settings, settings
from .store import (
    DEFAULT_DB,
    Failure,
    Hit,
    IndexStatus,
    Item,
    NewItem,
    Store,
    check_same_model,
    database_exists,
    open_store,
    validate_namespace,
)

if TYPE_CHECKING:
    from .catalog import CatalogOptions
    from .distributed import RayOptions
    from .encoders import Encoder
    from .pipeline import IngestOptions, IngestPlan, IngestPreview, IngestReport
    from .search import DuplicateGroup
    from .sources import Source

SEARCH_MODES = ("vector", "keyword", "hybrid")
# how deep paging goes: offset + limit of a search, as Immich's smart search scrolls to
MAX_RESULTS = 5000


@dataclass
class CollectionInfo:
    """What ``Collection.info()`` reports."""

    namespace: str
    location: str
    identity: ModelIdentity
    model_spec: dict[str, Any]
    items: int
    failures: int
    index: IndexStatus
    runtime: str  # what an ingest here runs the model on now, and why (encoders.choose_runtime)
    runtime_reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "model": self.identity.model_id,
            "backend": self.identity.backend,
            "dim": self.identity.dim,
            "items": self.items,
            "failures": self.failures,
            "index": self.index.kind,
            "index_fresh": self.index.fresh,
            "index_tombstones": self.index.tombstones,
            "deleted_unpurged": self.index.unpurged,
            "index_id_map": self.index.id_map,
            "index_reason": self.index.reason,
            "index_memory": self.index.memory,
            "runtime": self.runtime,
            "runtime_reason": self.runtime_reason,
            "identity": self.identity.as_dict(),
            "model_spec": self.model_spec,
        }


def open(
    db: str | Path | None = None,
    namespace: str | None = None,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    weights: str | Path | None = None,
    device: str = "auto",
    runtime: str | None = None,
    precision: str | None = None,
    decode: str | None = None,
    create: bool = True,
    notice: Callable[[str], None] | None = None,
    loading: Callable[[str], contextlib.AbstractContextManager] | None = None,
    few_calls: bool = False,
) -> Collection:
    """Open the collection ``namespace`` of the store ``db`` (a SQLite file, created if absent,
    or a ``postgresql://`` URL); defaults come from ``CLIPSEARCH_DB`` / ``CLIPSEARCH_NAMESPACE``,
    else ``clipsearch.db`` / ``default``.

    The model arguments are optional: without them the collection uses the model recorded for
    the namespace, else ViT-B-32 / openai. ``decode``: ``fast`` (JPEGs decoded at reduced scale,
    the default) or ``exact`` (full decode, the reference's pixels), recorded with the namespace
    like the runtime. ``create=False`` refuses a SQLite file that does not exist instead of
    creating it. ``notice``, ``loading`` and ``few_calls``: see ``Collection``. Use it as a
    context manager, or call ``close()``::

        with clipsearch.open("photos.db") as photos:
            photos.ingest(["~/Pictures"])
            for hit in photos.search("a dog on a beach", limit=5):
                print(f"{hit.score:.3f} {hit.path}")
    """
    config = settings()  # the one read of the environment; the collection passes it down
    location = str(db) if db is not None else config.db
    name = validate_namespace(namespace or config.namespace)
    if not create and not database_exists(location):
        raise NoDatabaseError(location)
    choice = ModelChoice(model, pretrained, weights, device, runtime, precision, decode)
    store = open_store(location, settings=config)
    return Collection(
        store, name, choice, db=location, notice=notice, loading=loading, few_calls=few_calls, settings=config
    )


def describe(db: str | Path | None = None) -> tuple[str, list[CollectionInfo]]:
    """Every collection of a store, as ``info()`` reports it: (the store's location, infos)."""
    location = str(db) if db is not None else settings().db
    if not database_exists(location):
        raise NoDatabaseError(location)
    with open_store(location) as store:
        return store.location, [Collection(store, ns.name, owns_store=False).info() for ns in store.namespaces()]


class Collection:
    """One namespace of a store and the model of its vectors.

    Made by ``clipsearch.open(...)``. Methods:

    - ``ingest(sources, ...)``: embed folders, image lists, catalogs, files (resumable, incremental);
    - ``search(text=..., image=..., vector=..., limit=, filter=, mode=)``: ranked ``Hit`` objects;
    - ``similar(id)``, ``duplicates(threshold)``, ``export(path)``, ``info()``, ``failures()``;
    - ``embed_texts(texts)``, ``embed_images(images)``: vectors in the collection's space;
    - ``get(ids)``, ``delete(ids)``, ``close()``.

    Searching or writing with a model other than the one that made the namespace's vectors raises
    ``ModelMismatchError``. Errors are ``clipsearch.ClipsearchError`` subclasses with fields.
    Not safe for concurrent use from several threads; open one per thread.
    """

    def __init__(
        self,
        store: Store,
        namespace: str,
        choice: ModelChoice | None = None,
        *,
        owns_store: bool = True,
        db: str | None = None,
        encoder: Encoder | None = None,
        spec: ModelSpec | None = None,
        notice: Callable[[str], None] | None = None,
        loading: Callable[[str], contextlib.AbstractContextManager] | None = None,
        few_calls: bool = False,
        settings: Settings | None = None,
    ):
        """Usually made by ``clipsearch.open``. ``store``: an open store (``owns_store``: close it
        with the collection); ``choice``: the model asked for; ``encoder``: a model already
        loaded for this collection (the server's, say), and ``spec`` the spec it was loaded from.
        ``notice(message)`` hears of slow one-time work (the first query of a model exports its
        towers); ``loading(model name)`` wraps a model load in a context manager (a face shows a
        spinner); ``few_calls``: a command that answers one query and exits, so the towers skip
        the weight repacking that pays off only over many calls. ``settings``: the ``CLIPSEARCH_*``
        settings (default: the environment's, read now); everything the collection runs gets them
        from here."""
        self.store = store
        self.namespace = validate_namespace(namespace)
        self.choice = choice or ModelChoice()
        self.db = db or store.location
        self._owns_store = owns_store
        self._encoder = encoder  # the full model (PyTorch, or ONNX through it), loaded on demand
        self._given_encoder = encoder is not None
        self._towers: Encoder | None = None  # the torch-free query encoder, loaded on demand
        self._spec: ModelSpec | None = spec
        self._lock = threading.Lock()
        # the metadata keys check_filter last read: on PostgreSQL a read scans every row's metadata
        self._keys: dict[str, dict[str, int]] | None = None
        self.notice = notice
        self.loading = loading
        self.few_calls = few_calls
        self.settings = settings or Settings.from_env()

    # -- life cycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Close the store (if this collection opened it)."""
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Collection {self.namespace!r} in {self.store.location}>"

    @property
    def location(self) -> str:
        """Where the store is (a PostgreSQL URL without its password)."""
        return self.store.location

    # -- the model -----------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        """Whether the namespace holds vectors (anything was ever ingested into it)."""
        return self.store.identity(self.namespace) is not None

    def identity(self) -> ModelIdentity:
        """The model that made the namespace's vectors; NamespaceNotFoundError if none did."""
        identity = self.store.identity(self.namespace)
        if identity is None:
            raise NamespaceNotFoundError(self.namespace, self.store.location)
        return identity

    def _recorded_spec(self) -> dict[str, Any] | None:
        if self.choice.names_a_model:
            return None  # what is recorded does not matter
        info = self.store.namespace(self.namespace)
        return info.model_spec if info else None

    @property
    def spec(self) -> ModelSpec:
        """The model this collection loads: see ``ModelChoice.resolve``."""
        if self._spec is None:
            recorded = self._recorded_spec()
            spec = self.choice.resolve(recorded)
            if recorded is None and not self.choice.names_a_model:
                return spec  # nothing recorded yet: an ingest may record it, ask again then
            self._spec = spec
        return self._spec

    @property
    def encoder(self) -> Encoder:
        """The full model (loaded on first use; ingest and ``--runtime torch`` use it)."""
        if self._encoder is None:
            from .encoders import load_encoder, runnable_spec

            self._refuse_known_mismatch()
            spec = runnable_spec(self.spec, self.choice.runtime is not None)
            with self.loading(spec.label) if self.loading else contextlib.nullcontext():
                self._encoder = load_encoder(spec, few_calls=self.few_calls)
            self._tell(self._encoder.notes)
        return self._encoder

    def _tell(self, notes: Iterable[str]) -> None:
        for note in notes:
            if self.notice:
                self.notice(note)

    def check_model(self, identity: ModelIdentity) -> None:
        """Raise ModelMismatchError unless ``identity`` made this namespace's vectors."""
        check_same_model(self.namespace, self.identity(), identity)

    def query_encoder(self) -> Encoder:
        """The encoder for queries, checked against the namespace's model: the full model if
        one is loaded or asked for, else the model's ONNX towers without torch (exported once, on
        first use, and cached). ``CLIPSEARCH_QUERY_RUNTIME=torch`` keeps queries on PyTorch."""
        stored = self.identity()
        with self._lock:
            if self._encoder is None and self._towers is None:
                self._refuse_known_mismatch()
            encoder = self._encoder or self._towers or self._load_query_encoder()
        check_same_model(self.namespace, stored, encoder.identity)
        return encoder

    def _refuse_known_mismatch(self) -> None:
        """ModelMismatchError at once where the request already proves another model (another
        architecture, tag or quantisation): loading or exporting it first could take a minute,
        or end in a missing-weights error that hides the real one."""
        if not (self.choice.names_a_model or self.choice.precision):
            return  # the recorded model: nothing to compare yet
        stored = self.store.identity(self.namespace)
        if stored is None:
            return
        requested, reasons = known_differences(stored, self.spec)
        if reasons:
            raise ModelMismatchError(self.namespace, stored, requested, reasons)

    def _load_query_encoder(self) -> Encoder:
        from .encoders import check_runtime

        spec = self.spec
        check_runtime(spec)
        if spec.backend == "onnx":  # a tower folder: it is its own query encoder
            return self.encoder
        torch_asked = self.choice.runtime is not None and spec.runtime == "torch"
        if (
            torch_asked
            or spec.backend != "open_clip"  # the towers are open_clip's export
            or spec.device not in ("auto", "cpu")
            or self.settings.query_runtime == "torch"
        ):
            return self.encoder
        from .encoders import decoded_as
        from .encoders.towers import TowerEncoder, find_export

        folder = find_export(spec, spec.precision)
        if folder is None:
            loaded = self.prepare_query_towers()
            if not isinstance(loaded, TowerEncoder) or loaded.tokenize_needs_model:
                self._encoder = loaded  # a tokenizer of its own: queries keep needing torch
                return loaded
            folder = loaded.folder
        self._towers = decoded_as(TowerEncoder(folder, spec.precision, few_calls=self.few_calls), spec.decode)
        return self._towers

    def prepare_query_towers(self) -> Encoder:
        """Export the model's ONNX towers if they are not yet (once per model; it needs the
        ``torch`` extra), so that queries run without torch; returns the exported encoder."""
        from .encoders import load_encoder, require_torch

        spec = dataclasses.replace(self.spec, runtime="onnx", device="cpu")
        require_torch(f"exporting {spec.label} to ONNX for queries")
        if self.notice:
            self.notice(f"exporting {spec.label} to ONNX once, so that later queries need no torch ...")
        with self.loading(spec.label) if self.loading else contextlib.nullcontext():
            loaded = load_encoder(spec)
        self._tell(loaded.notes)
        return loaded

    # -- writing -------------------------------------------------------------------------------
    def ingest(
        self,
        sources: Iterable[str | Path | Source],
        options: IngestOptions | None = None,
        *,
        progress: Callable[[int, int], None] | bool | None = None,
        recursive: bool = True,
        catalog: CatalogOptions | None = None,
        ray: RayOptions | None = None,
        prune: bool = False,
    ) -> IngestReport:
        """Embed images into the collection; resumable and incremental (docs/ingest.md).

        ``sources``: folders, ``images:DIR``, ``image-list:FILE``, ``catalog:FILE``, image files,
        or ``Source`` objects. ``options``: how to run (``IngestOptions``: ``batch_size``,
        ``limit``, ``workers``, ``filters``, ``sample``, ``embed_text``, ``offline``, ...).
        ``catalog``: the catalog columns (``CatalogOptions``). ``ray``: run on a Ray cluster
        (``RayOptions``). ``progress(done, total)`` hears about every item; ``progress=True``
        shows a progress bar on stderr where a person watches (a terminal or a notebook), and
        nothing where output goes to a file or a pipe.
        ``prune``: first remove the items of the given folders, image lists and catalogs whose
        file or row is gone, keeping the vector of a file that was renamed or moved (``sync``);
        not with ``limit``, ``filters`` or ``sample``, which list only part of the sources.
        Raises ModelMismatchError if the namespace holds another model's vectors.
        """
        from .pipeline import IngestOptions, IngestPlan

        if isinstance(progress, bool):
            with _progress_bar(progress) as callback:
                return self.ingest(
                    sources, options, progress=callback, recursive=recursive, catalog=catalog, ray=ray, prune=prune
                )
        options = options or IngestOptions()
        parsed = self.parse_sources(sources, recursive=recursive, catalog=catalog, filters=options.filters)
        if prune:
            self._check_prunable(parsed, options)
        # what there is to do is decided before any model loads or any cluster starts
        started = time.perf_counter()
        plan = IngestPlan.of(parsed, options)
        pruned = None
        if prune:
            from .sync import prune as prune_folders

            # first: a moved file then finds its vector stored under its new id, and is skipped
            pruned = prune_folders(self.store, self.namespace, parsed, plan.items)
        report = self._ingest_planned(plan, options, started, progress, ray)
        if pruned is not None:
            report.removed, report.moved = pruned.removed, pruned.moved
        if not report.interrupted:  # Ctrl-C asked to stop, not to start a minute-long export
            self._prepare_after_ingest()
        return report

    def count_by(self, key: str) -> list[tuple[Any, int]]:
        """How many items have each value of metadata ``key`` (``info --by client``): (value,
        items), most first; a list value counts each element; (None, n) last for the n items
        without the key. UsageError for a key no item has, with the keys there are."""
        counts = self.store.count_by(self.namespace, key)
        if counts and all(value is None for value, _ in counts):  # an empty namespace has no keys to list
            keys = sorted(
                {k for batch in self.store.iter_items(self.namespace, 1000) for it in batch for k in it.metadata}
            )
            raise UsageError(f"no item has the metadata key {key!r}; their keys: {', '.join(keys)}", param="by")
        return counts

    def preview_ingest(
        self,
        sources: Iterable[str | Path | Source] | str | Path,
        options: IngestOptions | None = None,
        *,
        recursive: bool = True,
        catalog: CatalogOptions | None = None,
    ) -> IngestPreview:
        """What ``ingest`` with these arguments would do, counted (``IngestPreview``: items listed
        and selected, unchanged, failed before, new, changed, files to read, URLs cached and to
        fetch, failures known at once by kind). Loads no model, fetches nothing, writes nothing."""
        from .pipeline import IngestOptions, IngestPlan, preview

        options = options or IngestOptions()
        parsed = self.parse_sources(sources, recursive=recursive, catalog=catalog, filters=options.filters)
        plan = IngestPlan.of(parsed, options)
        cache_dir = options.cache_dir or self.settings.download_cache(self.db)
        return preview(self.store, self.namespace, plan, options, cache_dir)

    @staticmethod
    def _check_prunable(parsed: list[Source], options: IngestOptions) -> None:
        from .sync import PRUNABLE

        given = {"limit": options.limit, "filters": options.filters, "sample": options.sample}
        partial = [name for name, value in given.items() if value not in (None, {})]
        if partial:
            raise UsageError(
                f"{option('prune')} with {' and '.join(map(option, partial))} would remove items merely left "
                f"out of this run; {option('prune')} over the whole sources",
                param="prune",
            )
        single = [s.description for s in parsed if not isinstance(s, PRUNABLE)]
        if single:
            raise UsageError(
                f"{option('prune')} keeps folders, image lists and catalogs in step; {single[0]} is a single file, "
                "which owns no other items",
                param="prune",
            )

    def _prepare_after_ingest(self) -> None:
        """After an ingest on the PyTorch model, export the query towers now rather than on the
        first query (which would then wait for it)."""
        from .encoders import torch_installed
        from .encoders.towers import find_export

        spec = self.spec
        if (
            self._encoder is None  # nothing was loaded: a no-op run, or the towers ingested
            or self._given_encoder  # the caller's model (the server's): queries use it too
            or spec.backend != "open_clip"
            or self.settings.query_runtime == "torch"
            or not torch_installed()
            or find_export(spec, spec.precision) is not None
        ):
            return
        self.prepare_query_towers()

    def _ingest_planned(
        self,
        plan: IngestPlan,
        options: IngestOptions,
        started: float,
        progress: Callable[[int, int], None] | None,
        ray: RayOptions | None,
    ) -> IngestReport:
        from .encoders.interface import FEW_IMAGES
        from .pipeline import Ingestor, LocalExecutor, Survey, survey

        recorded = self.store.namespace(self.namespace)
        if recorded is None:  # a new namespace: every item is new
            found = Survey(None, len(plan.items))
        else:  # images counted only where it is used: to open the model the fastest way for a few
            found = survey(self.store, self.namespace, plan, options, FEW_IMAGES if ray is None else -1)
        # the model that made the namespace (named again, or not named): no need to load it
        if recorded is not None and self.spec.to_dict() == recorded.model_spec and found.done is not None:
            done = found.done  # everything is stored (or failed before) and unchanged
            done.seconds = time.perf_counter() - started
            if progress:
                progress(len(plan.items), len(plan.items))
            return done
        if options.cache_dir is None:  # downloads beside a SQLite file, else in the user's cache
            options = dataclasses.replace(options, cache_dir=self.settings.download_cache(self.db))
        ingestor = Ingestor(self.store, self.encoder, self.spec, self.namespace, options)
        if ray is None:
            # the model loads while the first files are read and decoded; for a few photos, the
            # way that loads fastest; for metadata alone, when first needed (if ever)
            if found.to_embed:
                self.encoder.prepare_images(found.to_embed)
            return self._ran_on(ingestor.run(plan, LocalExecutor(), progress))
        from .distributed import RayExecutor

        return ingestor.run(plan, RayExecutor(ray, self.db), progress)

    def _ran_on(self, report: IngestReport) -> IngestReport:
        """``report`` with the runtime the model ran on in this process, if it was loaded at all."""
        if self._encoder is not None:
            report.runtime = self._encoder.identity.runtime
        return report

    @staticmethod
    def parse_sources(
        sources: Iterable[str | Path | Source] | str | Path,
        *,
        recursive: bool = True,
        catalog: CatalogOptions | None = None,
        filters: dict[str, Any] | None = None,
    ) -> list[Source]:
        """Sources as ``ingest`` reads them, checked (paths exist, filter columns are in each
        catalog) without loading anything."""
        from .catalog import CatalogSource
        from .source_spec import parse_source

        if isinstance(sources, str | Path):
            sources = [sources]
        parsed = [
            parse_source(str(s), recursive=recursive, catalog=catalog) if isinstance(s, str | Path) else s
            for s in sources
        ]
        for source in parsed:
            if isinstance(source, CatalogSource) and filters:
                source.require(list(filters))
        return parsed

    def add_vectors(
        self,
        ids: Sequence[str],
        vectors: Any,
        metadata: Sequence[dict[str, Any]] | None = None,
        *,
        model: ModelIdentity | None = None,
        model_spec: dict[str, Any] | None = None,
        replace: bool = True,
    ) -> int:
        """Store vectors made elsewhere (``n x d``), with their ids and metadata, under ``model``,
        the model that made them: ``export`` records it (``clipsearch.imports`` reads it back).
        Without it, the namespace's model, or for a new namespace the model this collection was
        opened with, as for ``ingest`` (that loads it, to learn its dimensions). Rows are
        L2-normalised (search scores are cosines). Refused before anything is written: another
        model than the namespace's (ModelMismatchError), another dimension, a row of zeros or
        NaN, and with ``replace=False`` ids that are already stored. ``model_spec``: how to load
        the model for text and image queries (``ModelSpec.to_dict()``, as ``export`` records it);
        default: the model options given, else the model's name. Returns how many rows."""
        ids = [str(i) for i in ids]
        matrix = np.asarray(vectors, dtype=np.float32)
        if matrix.ndim != 2 or len(matrix) != len(ids):
            raise UsageError(
                f"{len(ids)} ids need {len(ids)} vectors, one row each, not an array of shape {matrix.shape}",
                param="vectors",
            )
        metas = [dict(m) for m in metadata] if metadata is not None else [{} for _ in ids]
        if len(metas) != len(ids):
            raise UsageError(f"{len(ids)} ids but {len(metas)} metadata records", param="metadata")
        identity = self._identity_for_vectors(model)
        if matrix.shape[1] != identity.dim:
            raise UsageError(
                f"the vectors have {matrix.shape[1]} dimensions; {identity.model} makes {identity.dim}", param="vectors"
            )
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        bad = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
        if len(bad):
            raise UsageError(f"the vector of {ids[bad[0]]!r} is zeros, NaN or infinite", param="vectors")
        if not replace and self.exists:
            self._refuse_present(ids)
        if not self.exists:
            spec = model_spec or (self.spec.to_dict() if self.choice.names_a_model else None)
            spec = (
                spec
                or ModelSpec(
                    identity.model, identity.pretrained or None, runtime=identity.runtime, precision=identity.precision
                ).to_dict()
            )
            self.store.bind_namespace(self.namespace, identity, spec)
        items = [NewItem(i, m) for i, m in zip(ids, metas, strict=True)]
        self.store.write_batch(self.namespace, items, matrix / norms)
        return len(items)

    def _refuse_present(self, ids: list[str]) -> None:
        present = [it.id for it in self.store.get_items(self.namespace, ids)]
        if present:
            shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
            raise UsageError(
                f"{len(present)} of these ids are already stored ({shown}); replace them or leave them out",
                param="replace",
            )

    def _identity_for_vectors(self, model: ModelIdentity | None) -> ModelIdentity:
        stored = self.store.identity(self.namespace)
        if model is not None:
            if stored is not None:
                check_same_model(self.namespace, stored, model)
            return model
        if stored is not None and not self.choice.names_a_model:
            return stored
        return self._embedder().identity  # the model options, checked against the namespace's

    def import_vectors(
        self,
        npy: str | Path,
        meta: str | Path | None = None,
        *,
        model: ModelIdentity | None = None,
        replace: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """The reverse of ``export``: vectors from ``npy`` (a ``.npy`` file, or a seed-compatible
        folder) with the ids and metadata of ``meta`` (JSON or JSON Lines; default ``npy`` with
        ``.json``), under the model the files record (else as ``add_vectors``), a chunk at a
        time (``model``: the model that made them, where the files do not say). Every record and
        vector is checked before the first is written.
        ``progress(done, total)`` hears of each chunk. Returns how many rows."""
        from .imports import open_import

        files = open_import(Path(npy), Path(meta) if meta is not None else None)
        identity = self._identity_for_vectors(files.model or model)
        if files.vectors.shape[1] != identity.dim:
            raise UsageError(
                f"{npy} holds {files.vectors.shape[1]}-d vectors; {identity.model} makes {identity.dim}", param="npy"
            )
        if not replace and self.exists:
            for ids, _ in files.id_chunks():  # all refused before any is written
                self._refuse_present(ids)
        done = 0
        for ids, vectors, metas in files.chunks():
            done += self.add_vectors(ids, vectors, metas, model=identity, model_spec=files.model_spec, replace=replace)
            if progress:
                progress(done, files.count)
        return done

    def delete(self, ids: Sequence[str]) -> int:
        """Remove items (their vectors and metadata); returns how many there were."""
        return self.store.delete_items(self.namespace, list(ids))

    # -- reading ---------------------------------------------------------------------------------
    def info(self) -> CollectionInfo:
        """Model, dimensions, item and failure counts, and the vector index's state."""
        ns = self.store.namespace(self.namespace)
        if ns is None:
            raise NamespaceNotFoundError(self.namespace, self.store.location)
        status = self.store.index_status(self.namespace)
        from .encoders import choose_runtime

        runnable, why = choose_runtime(self.choice.resolve(ns.model_spec), self.choice.runtime is not None)
        return CollectionInfo(
            ns.name, self.store.location, ns.identity, ns.model_spec, ns.items, ns.failures, status,
            runtime=runnable.runtime, runtime_reason=why,
        )  # fmt: skip

    def build_index(self, kind: str | None = "auto") -> IndexStatus:
        """Build the vector index, or bring it up to date (``index build``): ``auto`` chooses the
        kind by size and memory budget; ``flat``, ``hnsw`` or ``ivfpq`` build that kind and keep
        it. Also compacts an index that skips removed vectors, and retrains an IVF-PQ index."""
        self.identity()
        return self.store.build_index(self.namespace, kind)

    def failures(self) -> list[Failure]:
        """The items that could not be ingested, with their reasons."""
        return self.store.failures(self.namespace)

    def get(self, ids: Sequence[str]) -> list[Item]:
        """The stored items among ``ids``."""
        return self.store.get_items(self.namespace, list(ids))

    def item(self, item_id: str) -> Item:
        """The stored item ``item_id``; ItemNotFoundError if there is none."""
        self.identity()
        found = self.get([item_id])
        if not found:
            raise ItemNotFoundError(item_id, self.namespace)
        return found[0]

    def __len__(self) -> int:
        return self.store.count(self.namespace) if self.exists else 0

    def __iter__(self) -> Iterator[Item]:
        """Every stored item, in the order they were stored (without their vectors)."""
        if self.exists:
            for batch in self.store.iter_items(self.namespace):
                yield from batch

    def items(self, filter: dict[str, Any] | None = None, limit: int | None = None) -> list[Item]:
        """The stored items that pass ``filter`` (the rules of ``clipsearch.filters``, as search
        applies them), in the order they were stored, at most ``limit``."""
        import itertools

        from .filters import matcher

        if limit is not None and limit < 0:
            raise UsageError(f"limit must be 0 or more, not {limit}", param="limit")
        test = matcher(filter)  # a bad filter fails before any item is read
        passing = (item for item in self if test(item.metadata))
        return list(itertools.islice(passing, limit))

    # -- search ----------------------------------------------------------------------------------
    def search(
        self,
        text: str | None = None,
        *,
        image: Any = None,
        vector: Sequence[float] | np.ndarray | None = None,
        limit: int = 10,
        filter: dict[str, Any] | None = None,
        mode: str = "vector",
        add: Sequence[str] = (),
        subtract: Sequence[str] = (),
        offset: int = 0,
    ) -> list[Hit]:
        """The items nearest to a text, an image (a path, bytes or a PIL image) or a raw vector,
        best first; give exactly one. ``filter``: ``{key: value or [values]}`` on metadata (AND
        across keys). ``mode`` (text only): ``vector`` (CLIP), ``keyword`` (BM25 over item text
        and metadata; no model), or ``hybrid`` (both, fused by reciprocal rank). ``add`` and
        ``subtract``: texts whose vectors are added to or subtracted from the query's (vector
        mode; ``"2:sunset"`` weighs a term 2). ``offset``: skip that many of the best (a later
        page; ``offset + limit`` reaches ``MAX_RESULTS`` at most). Each ``Hit`` has ``id``,
        ``score``, ``path`` and ``metadata``."""
        plan = self.plan_search(
            text,
            image=image,
            vector=vector,
            limit=limit,
            filter=filter,
            mode=mode,
            add=add,
            subtract=subtract,
            offset=offset,
        )
        if plan.texts:
            # the text tower opens on another thread while the index is read (a cold query's
            # two slowest steps, side by side)
            self._embedder().prepare_texts()
            if plan.mode != "keyword":
                self.store.prepare_search(self.namespace)
        texts = self.embed_texts(plan.texts) if plan.texts else None
        image_vector = self.embed_images([plan.image])[0] if plan.image is not None else None
        return self.finish_search(plan, texts, image_vector)

    def plan_search(
        self,
        text: str | None = None,
        *,
        image: Any = None,
        vector: Sequence[float] | np.ndarray | None = None,
        limit: int = 10,
        filter: dict[str, Any] | None = None,
        mode: str = "vector",
        add: Sequence[str] = (),
        subtract: Sequence[str] = (),
        offset: int = 0,
    ) -> SearchPlan:
        """``search``'s rules applied, before anything is embedded: the arguments checked, the
        namespace found and, when the search needs the model, the model checked against the
        namespace's (ModelMismatchError). The plan says what to embed (``texts``, ``image``);
        ``finish_search`` takes the vectors. ``search`` embeds them here; the server embeds
        them in its batches, across requests."""
        from . import search as ops

        if sum(x is not None for x in (text, image, vector)) != 1:
            raise UsageError("give a text, an image or a vector to search by (exactly one)")
        mode = (mode or "vector").strip().lower()
        if mode not in SEARCH_MODES:
            raise UsageError(f"unknown search mode {mode!r}; use {', '.join(SEARCH_MODES)}", param="mode")
        if text is None and mode != "vector":
            raise UsageError(f"mode {mode} searches by text; search by image or vector in vector mode", param="mode")
        check_page(offset, limit)
        terms = tuple(ops.query_terms(add, subtract, mode))
        self.identity()  # the namespace must exist, before any model loads
        self.check_filter(filter)
        plan = SearchPlan(
            text=text,
            image=image,
            vector=None if vector is None else np.asarray(vector, np.float32),
            mode=mode,
            terms=terms,
            limit=limit,
            filter=filter,
            offset=offset,
        )
        if plan.texts or image is not None:
            self.query_encoder()  # the model that made the vectors, or ModelMismatchError now
        return plan

    def finish_search(
        self, plan: SearchPlan, texts: np.ndarray | None = None, image: np.ndarray | None = None
    ) -> list[Hit]:
        """The hits of a planned search, given the vectors of ``plan.texts`` (in order) and of
        ``plan.image``: the query's vector, plus or minus the terms', searched in the store."""
        from . import search as ops

        if plan.texts and (texts is None or len(texts) != len(plan.texts)):
            raise UsageError(f"the plan needs {len(plan.texts)} text vectors")
        if plan.image is not None and image is None:
            raise UsageError("the plan needs the image's vector")
        embeds_query = plan.text is not None and plan.mode != "keyword"
        query = texts[0] if embeds_query and texts is not None else image if plan.image is not None else plan.vector
        depth = plan.offset + plan.limit  # the best of all pages up to this one; this page is their end
        if plan.terms:
            assert texts is not None and query is not None
            base = query / max(float(np.linalg.norm(query)), 1e-12)
            combined = ops.combine(base, list(plan.terms), texts[1 if embeds_query else 0 :])
            hits = ops.search_vector(self.store, self.namespace, combined, depth, plan.filter)
        elif plan.text is None:
            assert query is not None
            hits = ops.search_vector(self.store, self.namespace, query, depth, plan.filter)
        else:
            hits = ops.search_text(self.store, None, self.namespace, plan.text, depth, plan.filter, plan.mode, query)
        return hits[plan.offset :]

    def similar(
        self,
        item_id: str,
        *,
        limit: int = 10,
        same_filter: Sequence[str] | None = None,
        offset: int = 0,
        filter: dict[str, Any] | None = None,
    ) -> list[Hit]:
        """Items nearest to item ``item_id`` by image vector, without the item itself.
        ``same_filter``: only items that share the item's value of each of these metadata keys;
        ``filter``: only those passing it. ``offset``: skip that many of the nearest (a later page)."""
        from .search import similar_items

        check_page(offset, limit)
        self.identity()
        self.check_filter(filter)
        same = list(same_filter) if same_filter else None
        return similar_items(self.store, self.namespace, item_id, offset + limit, same, filter)[offset:]

    # -- browsing --------------------------------------------------------------------------------
    def browse(
        self,
        *,
        offset: int = 0,
        limit: int = 40,
        filter: dict[str, Any] | None = None,
        order: str = "newest",
        folder: str | None = None,
    ) -> Page:
        """A page of the stored items without a query: ``order`` ``newest`` (last stored first),
        ``oldest`` or ``taken`` (the date a photo was taken, newest first; undated last), those
        passing ``filter`` and, with ``folder``, those whose file is in that folder or below it."""
        self.identity()
        self.check_filter(filter)
        items, total = self.store.list_items(
            self.namespace, offset=offset, limit=limit, filters=filter, order=order, folder=folder
        )
        return Page(items=items, total=total, offset=offset)

    def metadata_keys(self) -> dict[str, dict[str, int]]:
        """Each metadata key of the stored items: how many items have it, by the kind of value
        (number, text, bool, null, list, object)."""
        self.identity()
        return self.store.metadata_keys(self.namespace)

    def check_filter(self, filter: dict[str, Any] | None) -> None:
        """UsageError for a filter that would match nothing, silently, by mistake: on a key that
        no stored item has (a typo, or a key of another catalog), naming the keys there are; or
        a range of a key whose values are all numbers with a bound that is no number."""
        from .filters import filter_ranges, matcher

        if not filter:
            return
        matcher(filter)  # its shape first

        def problem(keys: dict[str, dict[str, int]]) -> UsageError | None:
            if not keys:  # nothing stored: nothing to tell a typo by
                return None
            missing = [key for key in filter if key not in keys]
            if missing:
                return UsageError(
                    f"no item has the metadata key {missing[0]!r} to filter on; their keys: {', '.join(sorted(keys))}",
                    param="filter",
                )
            for r in filter_ranges(filter):
                if r.number is None and set(keys[r.key]) <= {"number", "null"}:
                    return UsageError(
                        f"{r.key} is a number in every item, and the bound {r.text!r} is no number", param="filter"
                    )
            return None

        # the keys read before pass a filter; a refusal (or an empty store) is decided on the keys
        # read now, as this or another process may have written since
        if self._keys and problem(self._keys) is None:
            return
        # which keys there are: counts that may include deleted items not yet purged will do
        self._keys = self.store.metadata_keys(self.namespace, exact=False)
        error = problem(self._keys)
        if error is not None:
            raise error

    def folders(self) -> list[tuple[str, int]]:
        """(folder, items) for each folder that holds stored files, in name order."""
        from collections import Counter

        from .store.base import folder_of

        counts: Counter[str] = Counter()
        for path, n in self.count_by_value("path"):
            folder = folder_of(path)
            if folder is not None:
                counts[folder] += n
        return sorted(counts.items())

    def count_by_value(self, key: str) -> list[tuple[Any, int]]:
        """(value, items) for each value of metadata ``key``, most items first; no check that
        any item has the key (``count_by`` refuses one that none has)."""
        self.identity()
        return self.store.count_by(self.namespace, key)

    def duplicates(self, threshold: float = 0.95) -> list[DuplicateGroup]:
        """Groups of near-identical images: identical bytes first, then vectors whose cosine
        similarity is at least ``threshold``, joined transitively."""
        from .search import find_duplicates

        if not 0.0 <= threshold <= 1.0:
            raise UsageError("threshold must be between 0 and 1", param="threshold")
        self.identity()
        return find_duplicates(self.store, self.namespace, threshold)

    def export(self, out: str | Path, *, format: str = "npy", meta: str | Path | None = None) -> int:
        """Write the vectors and metadata; returns how many items. ``npy``: ``out`` is the .npy
        file (float32, N x D) and ``meta`` the JSON of ids and metadata in the same order
        (default: ``out`` with ``.json``). ``seed-compatible``: ``out`` is a folder with
        ``embeddings.npy``, ``metadata.json``, ``index.faiss``, ``index_ids.json``, ``manifest.json``."""
        from .export import export_seed_compatible, export_vectors

        if format not in ("npy", "seed-compatible"):
            raise UsageError(f"unknown export format {format!r}; use npy or seed-compatible", param="format")
        self.identity()
        out = Path(out).expanduser()
        if format == "npy":
            meta_path = Path(meta).expanduser() if meta else out.with_suffix(".json")
            for path, param in ((out, "out"), (meta_path, "meta")):
                if path.is_dir():
                    raise UsageError(f"{path} is a folder; give a file name to write", param=param)
                if not path.parent.is_dir():
                    raise UsageError(f"cannot write {path}: folder {path.parent} does not exist", param=param)
            write = lambda: export_vectors(self.store, self.namespace, out, meta_path)  # noqa: E731
        else:
            if out.exists() and not out.is_dir():
                raise UsageError(f"{out} is a file; the seed-compatible export writes a folder", param="out")
            write = lambda: export_seed_compatible(self.store, self.namespace, out)  # noqa: E731
        try:
            return write()
        except OSError as e:
            raise UsageError(f"cannot write {e.filename or out}: {e.strerror or e}", param="out") from None

    # -- embedding -------------------------------------------------------------------------------
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised vectors of ``texts`` (float32, n x d) in the collection's space. A new
        namespace uses the model given when opening, else the default."""
        if isinstance(texts, str):
            raise UsageError("embed_texts takes a list of texts")
        return self._embedder().embed_texts(list(texts))

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """L2-normalised vectors of images given as paths, bytes or PIL images, decoded exactly
        as ingest decodes stored files (a stored image embedded again scores 1.0 against itself).
        ImageError names the image that could not be read."""
        from .decode_stage import DecodeSettings, decode_crop
        from .imaging import DEFAULT_MAX_MEGAPIXELS

        encoder = self._embedder()
        settings_ = DecodeSettings.for_encoder(encoder, DEFAULT_MAX_MEGAPIXELS)
        crops = []
        for i, image in enumerate(images):
            label = str(image) if isinstance(image, str | Path) else f"image {i}"
            try:
                crops.append(_crop(image, encoder, settings_, decode_crop))
            except ImageError as e:
                raise ImageError(f"{label}: {e.message}") from None
        if not crops:
            return np.zeros((0, encoder.dim), np.float32)
        return encoder.embed_crops(np.stack(crops))

    def _embedder(self) -> Encoder:
        """The query encoder, checked, for an existing namespace; else the full model of the
        choice (nothing to check against yet)."""
        if self.exists:
            return self.query_encoder()
        return self.encoder


def check_page(offset: int, limit: int) -> None:
    """UsageError unless ``offset`` and ``limit`` ask for a page within ``MAX_RESULTS``."""
    if limit < 1:
        raise UsageError("limit must be at least 1", param="limit")
    if offset < 0:
        raise UsageError(f"offset must be 0 or more, not {offset}", param="offset")
    if offset + limit > MAX_RESULTS:
        raise UsageError(f"offset + limit may reach {MAX_RESULTS} at most, not {offset + limit}", param="offset")


@dataclass
class Page:
    """A page of browsed items (``Collection.browse``): ``total`` items pass in all."""

    items: list[Item]
    total: int
    offset: int

    @property
    def next_offset(self) -> int | None:
        """Where the next page starts, or None after the last."""
        end = self.offset + len(self.items)
        return end if self.items and end < self.total else None


@dataclass(frozen=True)
class SearchPlan:
    """A search with its rules applied, before any model runs (``Collection.plan_search``)."""

    text: str | None
    image: Any
    vector: np.ndarray | None
    mode: str
    terms: tuple[tuple[float, str], ...]
    limit: int
    filter: dict[str, Any] | None
    offset: int = 0

    @property
    def texts(self) -> list[str]:
        """The texts to embed, in order: the query's (unless the search is by keyword alone),
        then each ``add``/``subtract`` term's."""
        query = [self.text] if self.text is not None and self.mode != "keyword" else []
        return query + [t for _, t in self.terms]


def _crop(image: Any, encoder: Encoder, decode_settings: Any, decode_crop: Callable) -> np.ndarray:
    from PIL import Image

    if isinstance(image, Image.Image):
        from .imaging import to_rgb

        return encoder.preprocess.crop(to_rgb(image))
    if isinstance(image, str | Path):
        from .decode_stage import read_bytes

        data = read_bytes(Path(image).expanduser().read_bytes)
    elif isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
    elif isinstance(image, io.IOBase):
        data = image.read()
    else:
        raise UsageError(f"cannot embed a {type(image).__name__}: give a path, bytes or a PIL image")
    return decode_crop(data, decode_settings)[1]


__all__ = ["DEFAULT_DB", "Collection", "CollectionInfo", "ModelChoice", "describe", "open"]


@contextlib.contextmanager
def _progress_bar(wanted: bool) -> Iterator[Callable[[int, int], None] | None]:
    """``ingest(progress=True)``: a Rich progress bar on stderr, where someone watches it."""
    from rich.console import Console

    console = Console(stderr=True)
    if not wanted or not (console.is_terminal or console.is_jupyter):
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console)
    task = bar.add_task("ingest", total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)
