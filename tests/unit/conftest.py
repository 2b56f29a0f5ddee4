"""The unit tier's fake model: a real ``Encoder`` whose vector space is written down, so that the
Collection's contract (ingest, search, filters, similar, duplicates, the model guard) is tested in
milliseconds, on a real SQLite file, without torch or ONNX Runtime.

An image's vector is its mean colour with the grey taken out; a text naming a colour ("a red
square") gets that colour's vector, any other text a fixed vector of its own. So "red" ranks red
pictures first, as a trained CLIP model would, and a test can say which hits must come back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipsearch
from clipsearch.encoders.interface import Encoder
from clipsearch.identity import ModelIdentity, ModelSpec
from clipsearch.imaging import Preprocessor, PreprocessSpec
from clipsearch.store import open_store

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "purple": (150, 40, 180),
}


class FakeEncoder(Encoder):
    """Mean colour as a vector (dim 4, L2-normalised); ``model`` names its vector space."""

    def __init__(self, model: str = "fake-colour"):
        spec = PreprocessSpec(size=(32, 32))
        self.preprocess = Preprocessor(spec)
        self.identity = ModelIdentity("fake", model, "", 4, spec.to_dict(), runtime="onnx")
        self.calls = 0  # model calls: a test can tell whether anything was embedded

    @staticmethod
    def _colour_vectors(rgb: np.ndarray) -> np.ndarray:
        centred = rgb - rgb.mean(axis=1, keepdims=True)
        vectors = np.concatenate([centred, np.full((len(rgb), 1), 0.05)], axis=1).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        self.calls += 1
        spec = self.preprocess.spec
        mean = np.asarray(spec.mean, np.float32)[None, :]
        std = np.asarray(spec.std, np.float32)[None, :]
        rgb = pixels.mean(axis=(2, 3)) * std + mean  # back to 0..1 colour
        return self._colour_vectors(rgb)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        rows = []
        for text in texts:
            named = [c for c in COLOURS if c in text.lower()]
            if named:
                rows.append(np.asarray(COLOURS[named[0]], np.float32)[None, :] / 255)
            else:  # no colour: a direction of its own, the same every run
                seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
                rows.append(np.random.default_rng(seed).random((1, 3)).astype(np.float32))
        return self._colour_vectors(np.concatenate(rows)) if rows else np.zeros((0, 4), np.float32)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(t.split()) + 2 for t in texts]


def paint(path: Path, colour: str, size: tuple[int, int] = (48, 40)) -> Path:
    """A PNG of one colour, with a little noise so that no two files hash alike."""
    path.parent.mkdir(parents=True, exist_ok=True)
    seed = int.from_bytes(hashlib.sha256(str(path).encode()).digest()[:4], "little")
    noise = np.random.default_rng(seed).integers(0, 12, (size[1], size[0], 3))
    pixels = np.clip(np.asarray(COLOURS[colour])[None, None, :] + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def fake() -> FakeEncoder:
    return FakeEncoder()


@pytest.fixture
def photos(tmp_path) -> Path:
    """Ten pictures: two of each colour, in two folders."""
    folder = tmp_path / "photos"
    for i, colour in enumerate(COLOURS):
        paint(folder / f"{colour}-1.png", colour)
        paint(folder / "more" / f"{colour}-2.png", colour, size=(64 + i, 30))
    return folder


@pytest.fixture
def collection(tmp_path, fake):
    """A collection on a real SQLite file, its model the fake."""

    def make(encoder: Encoder | None = None, namespace: str = "default") -> clipsearch.Collection:
        db = tmp_path / "unit.db"
        spec = ModelSpec(model="fake-colour", pretrained=None, device="cpu", runtime="onnx")
        return clipsearch.Collection(open_store(db), namespace, encoder=encoder or fake, spec=spec, db=str(db))

    with make() as c:
        c.make = make  # type: ignore[attr-defined]
        yield c
