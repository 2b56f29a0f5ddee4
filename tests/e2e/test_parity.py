"""Parity with the references, for the same checkpoint: clipsearch's vectors against open_clip's
own (``create_model_and_transforms`` + ``encode_image``/``encode_text``, its tokenizer and
transform) and transformers' own (``CLIPModel.get_*_features`` + ``CLIPProcessor``), for photos
and for texts (short, over 77 tokens, Korean, Japanese, empty), on every runtime.

| runtime / decode | bound (cosine, every input) |
|---|---|
| torch, `--decode exact` | ≥ 0.99999 |
| ONNX fp32, `--decode exact` | ≥ 0.99999 (queries on the ONNX towers: our tokenizer, numpy preprocessing) |
| ONNX int8 (image tower int8) | ≥ 0.999 images, ≥ 0.99999 texts; top-10 overlap with fp32 reported |
| torch, `--decode fast` (reduced-scale JPEG decode) | ≥ 0.995 |

The checkpoints map inputs far apart (the trained test model; a transformers CLIP with small
class and position embeddings), and each test reports the spread of the reference's mutual
cosines (and asserts it is wide), so that a bound of 0.995 says something: with random weights
every photo sits at 0.99 of every other and any bound would pass.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import clipsearch
from clipsearch._compat import import_open_clip
from clipsearch.encoders.towers import TowerEncoder, find_export

from ..conftest import SAMPLE_PHOTOS, sample_photo
from ..families import shrink_positions
from ..trained import CLASSES, draw

TEXTS = [
    "a photo of a red circle",
    "a blue square on a pale background, " * 12,  # well over 77 tokens: cut as the reference cuts
    "빨간 원이 있는 사진",  # Korean
    "赤い丸の写真",  # Japanese
    "",
]
SPREAD = {}  # what each test measured, printed at the end (pytest -s) and asserted wide


def photos(tmp_path) -> list:
    """JPEG photos of odd sizes (so fast and exact decodes differ) and PNG drawings."""
    paths = []
    for i, name in enumerate(SAMPLE_PHOTOS):
        path = tmp_path / f"{name}.jpg"
        image = sample_photo(name)
        image.resize((image.width * 2 + i * 7, image.height * 2 + i * 5)).save(path, quality=92)
        paths.append(path)
    rng = np.random.default_rng(7)
    for label in CLASSES[:6]:
        path = tmp_path / f"{label.replace(' ', '_')}.png"
        draw(label, rng, (150, 110)).save(path)
        paths.append(path)
    return paths


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def spread(name: str, vectors: np.ndarray) -> float:
    """The median mutual cosine of the reference's vectors, recorded and returned."""
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    mutual = (v @ v.T)[np.triu_indices(len(v), 1)]
    SPREAD[name] = (float(np.median(mutual)), float(mutual.max()))
    return float(np.median(mutual))


@pytest.fixture(scope="module")
def open_clip_reference(trained_clip):
    open_clip = import_open_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{trained_clip}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{trained_clip}")
    model.eval()

    def images(paths) -> np.ndarray:
        with torch.no_grad():
            batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
            return model.encode_image(batch).numpy()

    def texts(texts) -> np.ndarray:
        with torch.no_grad():
            return model.encode_text(tokenizer(texts)).numpy()

    return images, texts


@pytest.mark.parametrize(
    ("runtime", "precision", "image_bound"),
    [("torch", "fp32", 0.99999), ("onnx", "fp32", 0.99999), ("onnx", "int8", 0.999)],
)
def test_open_clip_exact(open_clip_reference, trained_clip, tmp_path, runtime, precision, image_bound):
    ref_images, ref_texts = open_clip_reference
    paths = photos(tmp_path)
    reference = ref_images(paths)
    assert spread("open_clip photos", reference) < 0.8
    assert spread("open_clip texts", ref_texts(TEXTS)) < 0.95
    with clipsearch.open(
        tmp_path / "p.db", weights=trained_clip, runtime=runtime, precision=precision, decode="exact"
    ) as col:
        ours = col.embed_images(paths)
        text = col.embed_texts(TEXTS)
    assert cos(ours, reference).min() >= image_bound
    assert cos(text, ref_texts(TEXTS)).min() >= 0.99999
    if precision == "int8":
        with clipsearch.open(tmp_path / "f.db", weights=trained_clip, runtime="onnx", decode="exact") as col:
            fp32 = col.embed_images(paths)
        # neighbours of each photo among the others, int8 against fp32
        k = 10
        top = lambda v: np.argsort(-(v @ v.T), axis=1)[:, 1 : k + 1]  # noqa: E731
        overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top(ours), top(fp32), strict=True)])
        SPREAD["int8 top-10 overlap with fp32"] = (float(overlap), float(overlap))
        assert overlap >= 0.8


def test_open_clip_queries_on_the_towers(open_clip_reference, trained_clip, tmp_path):
    """A search's text query in a later process runs on the ONNX towers with clipsearch's own
    tokenizer: its vectors equal open_clip's (English, Korean, Japanese, over-long, empty)."""
    _, ref_texts = open_clip_reference
    paths = photos(tmp_path)
    with clipsearch.open(tmp_path / "t.db", weights=trained_clip) as col:
        col.ingest([paths[0]])
    with clipsearch.open(tmp_path / "t.db") as col:
        col.search("a photo", limit=1)  # the first query exports the towers
        folder = find_export(col.spec)
    assert folder is not None
    towers = TowerEncoder(folder)  # as a later process makes it: the tokenizer from tokenizer.json
    assert cos(towers.embed_texts(TEXTS), ref_texts(TEXTS)).min() >= 0.99999


def web_photos(tmp_path) -> list:
    """JPEGs at the size most photos of a web sample have (about 500x375): there the smallest
    DCT scale that still covers a 32-pixel model's input would do nearly all the downscaling."""
    paths = []
    for i, name in enumerate(SAMPLE_PHOTOS):
        path = tmp_path / f"{name}-web.jpg"
        sample_photo(name).resize((500 - i * 9, 375 - i * 7)).save(path, quality=90)
        paths.append(path)
    return paths


def test_open_clip_fast_decode(open_clip_reference, trained_clip, tmp_path):
    ref_images, _ = open_clip_reference
    paths = photos(tmp_path) + web_photos(tmp_path)
    reference = ref_images(paths)
    with clipsearch.open(tmp_path / "p.db", weights=trained_clip, decode="fast") as col:
        ours = col.embed_images(paths)
    worst = float(cos(ours, reference).min())
    SPREAD["fast decode, worst cosine"] = (worst, worst)
    assert worst >= 0.995


@pytest.fixture(scope="module")
def spread_hf(tiny_hf, tmp_path_factory):
    """The tiny transformers CLIP with small position and class embeddings (random ones make
    every picture alike), saved again the way transformers saves."""
    from transformers import CLIPModel

    folder = tmp_path_factory.mktemp("hf-spread")
    shutil.copytree(tiny_hf, folder, dirs_exist_ok=True)
    model = CLIPModel.from_pretrained(tiny_hf)
    torch.manual_seed(0)
    shrink_positions(model)
    model.save_pretrained(folder)
    return folder


def test_transformers(spread_hf, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(spread_hf).eval()
    processor = CLIPProcessor.from_pretrained(spread_hf)
    paths = photos(tmp_path)
    with torch.no_grad():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
        ref_images = _features(model.get_image_features(**pixels))
        tokens = processor(text=TEXTS, return_tensors="pt", padding=True, truncation=True, max_length=77)
        ref_texts = _features(model.get_text_features(**tokens))
    assert spread("transformers photos", ref_images) < 0.95
    with clipsearch.open(tmp_path / "h.db", weights=spread_hf, decode="exact") as col:
        assert cos(col.embed_images(paths), ref_images).min() >= 0.99999
        assert cos(col.embed_texts(TEXTS), ref_texts).min() >= 0.99999


def _features(output) -> np.ndarray:
    """transformers 5 returns a model output where 4 returned the tensor."""
    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return tensor.numpy()


@pytest.fixture(scope="module", autouse=True)
def report_the_spread():
    """Printed with ``pytest -s`` once the module ran: the numbers behind each bound."""
    yield
    for name, (median, worst) in sorted(SPREAD.items()):
        print(f"\n{name}: median {median:.4f}, max {worst:.4f}", end="")
