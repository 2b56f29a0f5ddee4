"""How good a model is on the user's own images: zero-shot classification (the CLIP paper's
protocol) and captioned-image retrieval (Recall@K).

The images go through ``Collection.ingest`` into the collection's namespace, so they are decoded
by exactly the pipeline that ingest and search use (``--decode``, runtime and precision
included), a broken image is a recorded failure left out of the score, and a second run over
the same images embeds nothing again. Texts are embedded by the collection's model.

- **Zero-shot**: a dataset is a folder of class subfolders (``cifar10-test/airplane/0000.jpg``)
  or an image list whose ``label`` column is the class. Each class's classifier is the mean of
  its prompts' normalised text vectors (one prompt per template, ``{}`` standing for the class
  name with ``_`` read as a space), normalised again; an image's prediction is the class whose
  classifier is nearest. Reported: top-1, top-5, the top-1 of each class, n.
- **Retrieval**: a catalog whose rows are (image, caption); rows that name the same image give it
  several captions. Text→image: a caption's own image among the K nearest images.
  Image→text: any of an image's captions among the K nearest captions. Recall@1, 5 and 10.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import UsageError

if TYPE_CHECKING:
    from .catalog import CatalogOptions
    from .collection import Collection
    from .pipeline import IngestOptions, IngestReport
    from .sources import Source, SourceItem

TEXT_BATCH = 256
RECALL_AT = (1, 5, 10)


def openai_imagenet_templates() -> list[str]:
    """The 80 prompt templates of OpenAI's ImageNet zero-shot evaluation (``{}`` is the class
    name), as open_clip ships them; kept as data here so that ``eval`` needs no torch (a test
    compares the file with open_clip's list)."""
    from importlib.resources import files

    text = files("clipsearch").joinpath("data/openai_imagenet_templates.txt").read_text(encoding="utf-8")
    return text.splitlines()


@dataclass
class ZeroShotReport:
    model: str
    n: int  # images scored
    classes: list[str]
    top1: float
    top5: float
    per_class: dict[str, float]  # top-1 of each class's images
    failed: int  # images that could not be read (left out of n)
    embedded: int  # images embedded in this run (the others were stored already)
    images_per_second: float  # of the images embedded in this run
    templates: int
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RetrievalReport:
    model: str
    images: int
    captions: int
    text_to_image: dict[int, float]  # K -> recall
    image_to_text: dict[int, float]
    failed: int
    embedded: int
    images_per_second: float
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["text_to_image"] = {f"R@{k}": v for k, v in self.text_to_image.items()}
        out["image_to_text"] = {f"R@{k}": v for k, v in self.image_to_text.items()}
        return out


def class_name(label: str) -> str:
    return label.replace("_", " ").strip()


def _labelled(source: Source) -> list[tuple[SourceItem, str]]:
    """(item, class label) for each image of a zero-shot dataset."""
    from .sources import FolderSource, ImageListSource

    out = []
    if isinstance(source, FolderSource):
        root = Path(source.root).absolute()
        for item in source:
            parts = Path(item.metadata["path"]).relative_to(root).parts
            if len(parts) < 2:
                raise UsageError(
                    f"{item.metadata['path']} is not in a class folder: a zero-shot dataset is a folder of class "
                    "subfolders (DATASET/CLASS/IMAGE) or an image list with a label column",
                    param="dataset",
                )
            out.append((item, parts[0]))
    elif isinstance(source, ImageListSource):
        for item in source:
            label = item.metadata.get("label")
            if not label:
                raise UsageError(f"{source.list_file}: {item.source} has no label (the second column)", param="dataset")
            out.append((item, str(label)))
    else:
        raise UsageError(
            f"{source.description}: a zero-shot dataset is a folder of class subfolders or image-list:FILE",
            param="dataset",
        )
    return out


def _text_vectors(collection: Collection, texts: Sequence[str]) -> np.ndarray:
    encoder = collection.encoder
    chunks = [encoder.embed_texts(list(texts[i : i + TEXT_BATCH])) for i in range(0, len(texts), TEXT_BATCH)]
    return np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)


def _embed(
    collection: Collection, source: Source, progress: Callable[[int, int], None] | None, options: IngestOptions | None
) -> tuple[IngestReport, float]:
    report = collection.ingest([source], options, progress=progress)
    return report, report.embedded / report.seconds if report.seconds > 0 and report.embedded else 0.0


def zero_shot(
    collection: Collection,
    dataset: str | Path | Source,
    *,
    templates: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    options: IngestOptions | None = None,
) -> ZeroShotReport:
    started = time.perf_counter()
    (source,) = collection.parse_sources([dataset])
    templates = list(templates) if templates else openai_imagenet_templates()
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise UsageError(f"template {bad[0]!r} has no {{}} for the class name", param="template")
    labelled = _labelled(source)
    if not labelled:
        raise UsageError(f"{source.description} holds no images", param="dataset")
    labels = sorted({label for _, label in labelled})
    if len(labels) < 2:
        raise UsageError(f"{source.description} has one class ({labels[0]}); zero-shot needs two or more")
    ingest, rate = _embed(collection, source, progress, options)
    stored = collection.store.get_vectors(collection.namespace, [item.id for item, _ in labelled])
    scored = [(stored[item.id], labels.index(label)) for item, label in labelled if item.id in stored]
    names = [class_name(label) for label in labels]
    prompts = [t.format(name) for name in names for t in templates]
    text = _text_vectors(collection, prompts).reshape(len(names), len(templates), -1)
    classifier = text.mean(axis=1)
    classifier /= np.linalg.norm(classifier, axis=1, keepdims=True)
    n = len(scored)
    if n:
        images = np.stack([v for v, _ in scored])
        truth = np.array([c for _, c in scored])
        ranked = np.argsort(-(images @ classifier.T), axis=1, kind="stable")
        top1_hits = ranked[:, 0] == truth
        top5_hits = (ranked[:, :5] == truth[:, None]).any(axis=1)
        per_class = {names[c]: float(top1_hits[truth == c].mean()) for c in range(len(names)) if (truth == c).any()}
    else:
        top1_hits = top5_hits = np.zeros(0, bool)
        per_class = {}
    return ZeroShotReport(
        model=collection.identity().model_id,
        n=n,
        classes=names,
        top1=float(top1_hits.mean()) if n else 0.0,
        top5=float(top5_hits.mean()) if n else 0.0,
        per_class=per_class,
        failed=len(labelled) - n,
        embedded=ingest.embedded,
        images_per_second=rate,
        templates=len(templates),
        seconds=time.perf_counter() - started,
        config=_config(collection),
    )


def retrieval(
    collection: Collection,
    dataset: str | Path | Source,
    *,
    catalog: CatalogOptions,
    progress: Callable[[int, int], None] | None = None,
    options: IngestOptions | None = None,
) -> RetrievalReport:
    from .catalog import CatalogSource

    started = time.perf_counter()
    if not catalog.text_columns:
        raise UsageError("retrieval needs the caption column", param="text_columns")
    (source,) = collection.parse_sources([dataset], catalog=catalog)
    if not isinstance(source, CatalogSource):
        raise UsageError(f"{source.description}: retrieval reads a catalog:FILE of images and captions")
    rows = [item for item in source if item.error is None and item.text]
    if not rows:
        raise UsageError(f"{source.description} has no row with both an image and a caption")
    ingest, rate = _embed(collection, source, progress, options)
    stored = collection.store.get_vectors(collection.namespace, [item.id for item in rows])
    image_of: dict[str, int] = {}  # the image a row names -> its index
    image_vectors, captions, caption_image = [], [], []
    for item in rows:
        if item.id not in stored:
            continue  # its image failed
        index = image_of.setdefault(item.source, len(image_of))
        if index == len(image_vectors):
            image_vectors.append(stored[item.id])
        captions.append(item.text)
        caption_image.append(index)
    t2i = {k: 0.0 for k in RECALL_AT}
    i2t = {k: 0.0 for k in RECALL_AT}
    if captions:
        images = np.stack(image_vectors)
        texts = _text_vectors(collection, captions)
        owner = np.array(caption_image)
        scores = texts @ images.T  # captions x images
        by_caption = np.argsort(-scores, axis=1, kind="stable")
        rank_of_own = (by_caption == owner[:, None]).argmax(axis=1)
        by_image = np.argsort(-scores.T, axis=1, kind="stable")  # images x captions, best first
        first_own = (owner[by_image] == np.arange(len(images))[:, None]).argmax(axis=1)
        for k in RECALL_AT:
            t2i[k] = float((rank_of_own < k).mean())
            i2t[k] = float((first_own < k).mean())
    return RetrievalReport(
        model=collection.identity().model_id,
        images=len(image_vectors),
        captions=len(captions),
        text_to_image=t2i,
        image_to_text=i2t,
        failed=len(rows) - len(captions),
        embedded=ingest.embedded,
        images_per_second=rate,
        seconds=time.perf_counter() - started,
        config=_config(collection),
    )


def _config(collection: Collection) -> dict[str, Any]:
    spec = collection.spec
    return {"runtime": spec.runtime, "precision": spec.precision, "decode": spec.decode, "device": spec.device}
