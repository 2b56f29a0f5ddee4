"""Every model family the README names, end to end (load, embed, ingest, search) and against
its reference library's own vectors: SigLIP and SigLIP 2 through transformers, a multilingual
CLIP (XLM-RoBERTa text tower) through open_clip, searched in Korean and Japanese. The
checkpoints and their tokenizers are built here (``tests/families.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import clipsearch
from clipsearch._compat import import_open_clip
from clipsearch.errors import UsageError

from ..conftest import sample_photo
from ..families import make_tiny_multilingual_clip, make_tiny_siglip, make_tiny_siglip2, make_tiny_siglip2_naflex
from ..trained import draw

TEXTS = ["a photo of a red circle", "빨간 원이 있는 사진", "赤い丸の写真", "green " * 40, ""]


def cos(a, b) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("family-photos")
    rng = np.random.default_rng(3)
    for label in ("red circle", "blue square", "green triangle", "yellow circle"):
        draw(label, rng, (120, 90)).save(folder / f"{label.replace(' ', '_')}.png")
    sample_photo("coffee").save(folder / "coffee.jpg", quality=90)
    return folder


def _features(output) -> np.ndarray:
    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return tensor.detach().numpy()


def _end_to_end(cli, weights, pictures, tmp_path, queries):
    db = tmp_path / "family.db"
    code, out, err = cli("ingest", pictures, "--weights", weights, "--db", db, "--json")
    assert code == 0, err
    assert json.loads(out)["embedded"] == 5
    for query in queries:
        code, out, err = cli("search", query, "--db", db, "--json", "--limit", "3")
        assert code == 0, err
        assert len(out.splitlines()) == 3
    code, out, err = cli("search", "--image", pictures / "coffee.jpg", "--db", db, "--json", "--limit", "1")
    assert code == 0, err
    hit = json.loads(out)
    assert hit["path"] == str(pictures / "coffee.jpg") and hit["score"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("make", [make_tiny_siglip, make_tiny_siglip2], ids=["siglip", "siglip2"])
def test_siglip_families_match_transformers(make, pictures, tmp_path, cli):
    from clipsearch._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import AutoModel, AutoProcessor

    folder = make(tmp_path / "model")
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    paths = sorted(pictures.iterdir())
    with torch.no_grad():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
        ref_images = _features(model.get_image_features(pixel_values=pixels["pixel_values"]))
        tokens = processor(text=TEXTS, padding="max_length", truncation=True, return_tensors="pt")
        ref_texts = _features(model.get_text_features(input_ids=tokens["input_ids"]))
    unit = ref_images / np.linalg.norm(ref_images, axis=1, keepdims=True)
    mutual = (unit @ unit.T)[np.triu_indices(len(paths), 1)]
    assert np.median(mutual) < 0.95  # the pictures map apart: the bounds below mean something
    with clipsearch.open(tmp_path / "p.db", weights=folder, decode="exact") as col:
        assert cos(col.embed_images(paths), ref_images).min() >= 0.9999
        assert cos(col.embed_texts(TEXTS), ref_texts).min() >= 0.99999
    _end_to_end(cli, folder, pictures, tmp_path, ["a red circle", "빨간 원", "赤い丸"])


def test_siglip2_naflex_is_refused_with_what_to_use(tmp_path):
    folder = make_tiny_siglip2_naflex(tmp_path / "naflex")
    with pytest.raises(UsageError, match="NaFlex") as err, clipsearch.open(tmp_path / "n.db", weights=folder) as col:
        col.embed_texts(["x"])
    assert "siglip2-base-patch16-224" in str(err.value)


def test_multilingual_clip_matches_open_clip_and_searches_korean_and_japanese(pictures, tmp_path, cli):
    folder = make_tiny_multilingual_clip(tmp_path / "mclip")
    open_clip = import_open_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    paths = sorted(pictures.iterdir())
    with torch.no_grad():
        ref_images = model.encode_image(torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths]))
        ref_texts = model.encode_text(tokenizer(TEXTS))
    with clipsearch.open(tmp_path / "m.db", weights=folder, decode="exact") as col:
        assert cos(col.embed_images(paths), ref_images.numpy()).min() >= 0.99999
        assert cos(col.embed_texts(TEXTS), ref_texts.numpy()).min() >= 0.99999
    # Korean and Japanese tokens are the model's own, not unknowns
    ids = tokenizer(["빨간 원", "赤い丸"])
    assert not (ids == tokenizer.tokenizer.unk_token_id).any()
    _end_to_end(cli, folder, pictures, tmp_path, ["빨간 원이 있는 사진", "赤い丸の写真", "a red circle"])
