"""The encoder interface: what ingest, search and the server ask of a model. Torch-free, so that
encoders that need no torch (the ONNX query towers) can implement it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..identity import ModelIdentity
from ..imaging import Preprocessor, PreprocessSpec

# "a few images" (Encoder.prepare_images): up to this many, a backend may load the way that is
# fastest to load rather than fastest per image
FEW_IMAGES = 16


class Encoder(ABC):
    """Maps images and texts into one L2-normalised vector space.

    ``embed_images`` and ``embed_texts`` return float32 arrays of shape (n, dim).
    """

    identity: ModelIdentity
    preprocess: Preprocessor
    # what loading the model wants a person told (which activation a checkpoint file runs
    # with, say); the collection passes them to its ``notice`` hook
    notes: tuple[str, ...] = ()

    @property
    def dim(self) -> int:
        return self.identity.dim

    @property
    def model_id(self) -> str:
        return self.identity.model_id

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return self.preprocess.spec

    def prepare_images(self, expected: int | None = None) -> None:
        """Start loading what embedding images needs, in the background where the backend can
        (an ingest calls it once it knows there is work, before it reads the first file).
        ``expected``: about how many images will be embedded, so that a backend can trade the
        time it takes to load for its speed per image. By default nothing: the model loads when
        it is first used."""
        return None

    def prepare_texts(self) -> None:
        """Start loading what embedding texts needs, in the background where the backend can (a
        search calls it before it reads its index). By default nothing."""
        return None

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_pixels(self.preprocess.batch(list(images)))

    @abstractmethod
    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embed preprocessed images, float32 (n, 3, H, W)."""

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """Embed resized and cropped images, uint8 (n, H, W, 3): normalised here, per batch."""
        return self.embed_pixels(self.preprocess.normalize(crops))

    @abstractmethod
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed a list of strings."""

    @abstractmethod
    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens each text occupies in the text tower (special tokens included, after truncation)."""

    def embed_texts_counted(self, texts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """``embed_texts`` plus ``count_tokens``; backends override it to tokenise only once."""
        texts = [str(t) for t in texts]
        return self.embed_texts(texts), self.count_tokens(texts)

    # whether calls from several threads can each be held to one core (``share_cores``)
    can_share_cores = False

    def share_cores(self, shared: bool) -> None:  # noqa: B027 - most encoders need not act
        """Calls from the current thread use one core (``shared``) or all of them. The server
        runs calls side by side this way, a core each: two full thread teams on the same cores
        stall each other (each team waits for its slowest thread) far more than one core costs."""

    @property
    def image_tokens(self) -> int:
        """Tokens one image occupies in a ViT image tower (patches + class token); 0 if unknown."""
        return 0
