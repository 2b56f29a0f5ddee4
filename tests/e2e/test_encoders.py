"""Both backends load saved checkpoints through the real loading code; errors are one clear line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clipsearch import _compat
from clipsearch.encoders import ModelIdentity, ModelSpec, load_encoder, resolve_device
from clipsearch.errors import DeviceUnavailableError, MissingWeightsError, UsageError

from ..conftest import sample_photo


def test_compat_makes_torchvision_importable():
    # Run in a fresh interpreter: this process may have imported torchvision already.
    code = (
        "import sys; from clipsearch import _compat; patched = _compat.ensure_torchvision_importable();"
        "import torchvision, open_clip;"
        "assert _compat._has_schema('nms') and _compat._has_schema('qnms');"
        "assert _compat.ensure_torchvision_importable() is False;"  # idempotent
        "print('patched' if patched else 'native')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in ("patched", "native")


def test_compat_is_a_no_op_once_torchvision_is_imported():
    _compat.import_open_clip()
    assert "torchvision" in sys.modules
    assert _compat.ensure_torchvision_importable() is False


def test_openclip_folder_loads_and_embeds(encoder, tiny_openclip):
    ident = encoder.identity
    assert ident.backend == "open_clip"
    assert ident.model == "local:tiny-openclip"
    assert ident.dim == 32 == encoder.dim
    assert ident.preprocess["size"] == [224, 224]
    imgs = [sample_photo(n) for n in ("astronaut", "coffee", "rocket")]
    vecs = encoder.embed_images(imgs)
    assert vecs.shape == (3, 32) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    texts = encoder.embed_texts(["a photo of a cat", "an astronaut", ""])
    assert texts.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert encoder.embed_texts([]).shape == (0, 32)
    assert encoder.embed_images([]).shape == (0, 32)


def test_embeddings_are_deterministic(encoder, tiny_openclip):
    img = sample_photo("chelsea")
    a = encoder.embed_images([img])
    b = encoder.embed_images([img])
    np.testing.assert_array_equal(a, b)
    # a second, independently loaded copy gives the same vectors too
    again = load_encoder(ModelSpec(weights=tiny_openclip, device="cpu"))
    np.testing.assert_allclose(again.embed_images([img]), a, atol=1e-6)
    np.testing.assert_allclose(again.embed_texts(["a cat"]), encoder.embed_texts(["a cat"]), atol=1e-6)


def test_batch_composition_does_not_change_vectors(encoder):
    imgs = [sample_photo(n) for n in ("astronaut", "coffee", "rocket", "chelsea")]
    together = encoder.embed_images(imgs)
    alone = np.concatenate([encoder.embed_images([im]) for im in imgs])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_checkpoint_file_with_builtin_architecture(tmp_path):
    """``--model ViT-B-32 --pretrained openai --weights FILE``: the real default architecture,
    random weights saved as a checkpoint file, loaded through open_clip with QuickGELU forced as
    the openai tag requires."""
    open_clip = _compat.import_open_clip()
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    path = tmp_path / "vit-b-32.safetensors"
    save_file(model.state_dict(), str(path))
    enc = load_encoder(ModelSpec(model="ViT-B-32", pretrained="openai", weights=path, device="cpu"))
    assert enc.identity.model_id == "ViT-B-32/openai"
    assert enc.dim == 512
    blocks = enc.model.visual.transformer.resblocks
    assert type(blocks[0].mlp.gelu).__name__ == "QuickGELU"
    with torch.inference_mode():
        expected = model.eval().encode_text(open_clip.get_tokenizer("ViT-B-32")(["a red dress"]))
    expected = torch.nn.functional.normalize(expected, dim=-1).numpy()
    np.testing.assert_allclose(enc.embed_texts(["a red dress"]), expected, atol=1e-5)


def test_hf_folder_loads_and_embeds(tiny_hf):
    enc = load_encoder(ModelSpec(model="hf:tiny/clip", weights=tiny_hf, device="cpu"))
    assert enc.identity.backend == "hf"
    assert enc.identity.model == "hf:tiny/clip"
    assert enc.dim == 24
    assert enc.identity.preprocess["size"] == [64, 64]
    vecs = enc.embed_images([sample_photo("astronaut"), sample_photo("rocket")])
    assert vecs.shape == (2, 24)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    texts = enc.embed_texts(["a dog", "a much longer sentence about a cat sitting on a mat"])
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    # a transformers folder given with --weights is recognised without naming the backend
    auto = load_encoder(ModelSpec(weights=tiny_hf, device="cpu"))
    assert auto.identity.backend == "hf" and auto.identity.model == "hf:tiny-hf-clip"


def test_hf_text_padding_is_cut_without_changing_vectors(tiny_hf):
    """CLIP's causal text tower: padding to the batch's longest text equals padding to 77."""
    enc = load_encoder(ModelSpec(model="hf:tiny/clip", weights=tiny_hf, device="cpu"))
    texts = ["a dog", "a much longer sentence about a cat sitting on a mat"]
    short = enc.embed_texts(texts)
    full = enc.tokenizer(texts, return_tensors="pt", padding="max_length", max_length=77)
    with torch.inference_mode():
        out = enc.model.get_text_features(input_ids=full["input_ids"], attention_mask=full["attention_mask"])
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    np.testing.assert_allclose(short, torch.nn.functional.normalize(out, dim=-1).numpy(), atol=1e-5)


def test_missing_openclip_weights_say_where_and_how(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(MissingWeightsError) as info:
        load_encoder(ModelSpec(model="ViT-B-32", pretrained="openai", device="cpu"))
    msg = str(info.value)
    assert "ViT-B-32" in msg and "'openai'" in msg
    assert "empty-cache" in msg  # where it looked
    assert "127.0.0.1 is unreachable" in msg  # why it could not download
    assert "with weights PATH" in msg and "network access" in msg
    assert "\n" not in msg


def test_missing_hf_weights(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(MissingWeightsError, match=r"openai/clip-vit-base-patch32.*weights PATH"):
        load_encoder(ModelSpec(model="hf:openai/clip-vit-base-patch32", device="cpu"))


def test_offline_mode_is_named_as_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(MissingWeightsError, match="HF_HUB_OFFLINE is set"):
        load_encoder(ModelSpec(model="ViT-B-16", pretrained="laion2b_s34b_b88k", device="cpu"))


def test_bad_weights_paths(tmp_path):
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_encoder(ModelSpec(weights=tmp_path / "nope.pt", device="cpu"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingWeightsError):
        load_encoder(ModelSpec(weights=empty, device="cpu"))


def test_unknown_model_and_tag():
    with pytest.raises(UsageError, match="no model 'ViT-Q-99'"):
        load_encoder(ModelSpec(model="ViT-Q-99", device="cpu"))
    with pytest.raises(UsageError, match=r"no pretrained weights 'nonsense' for ViT-B-32 \(known: openai"):
        load_encoder(ModelSpec(model="ViT-B-32", pretrained="nonsense", device="cpu"))


def test_device_selection_never_falls_back():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="sees no CUDA GPU"):
            resolve_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(DeviceUnavailableError, match="MPS"):
            resolve_device("mps")
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("tpu")


def test_identity_compatibility_rules():
    base = ModelIdentity("open_clip", "ViT-B-32", "openai", 512, {"size": [224, 224]})
    fp16 = ModelIdentity("open_clip", "ViT-B-32", "openai", 512, {"size": [224, 224]}, precision="fp16")
    int8 = ModelIdentity("open_clip", "ViT-B-32", "openai", 512, {"size": [224, 224]}, quantization="int8")
    other = ModelIdentity("open_clip", "ViT-B-32", "laion2b_s34b_b79k", 512, {"size": [224, 224]})
    assert base.compat_key == fp16.compat_key
    assert base.compat_key != int8.compat_key
    assert base.compat_key != other.compat_key
    assert ModelIdentity.from_dict(base.as_dict()) == base
    assert "pretrained 'openai' vs 'laion2b_s34b_b79k'" in base.differences(other)


def _fake_hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """Lay ``folder`` out as huggingface_hub's cache does after a download of ``repo``."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copy(f, snapshot / f.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)


def test_models_load_from_the_hub_cache_without_network(monkeypatch, tmp_path, tiny_openclip, tiny_hf):
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "tiny-org/tiny-openclip", tiny_openclip)
    _fake_hub_cache(cache, "tiny-org/tiny-clip", tiny_hf)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    oc = load_encoder(ModelSpec(model="hf-hub:tiny-org/tiny-openclip", device="cpu"))
    assert oc.identity.model_id == "hf-hub:tiny-org/tiny-openclip" and oc.dim == 32
    hf = load_encoder(ModelSpec(model="hf:tiny-org/tiny-clip", device="cpu"))
    assert hf.identity.model_id == "hf:tiny-org/tiny-clip" and hf.dim == 24
    # the same weights through --weights give the same vectors
    img = [sample_photo("rocket")]
    local = load_encoder(ModelSpec(weights=tiny_openclip, device="cpu"))
    np.testing.assert_allclose(oc.embed_images(img), local.embed_images(img), atol=1e-6)


def test_text_padding_cut_equals_padded_output(encoder):
    """CLIP's causal text tower: cutting padding after the longest real sequence changes nothing."""
    from clipsearch.encoders.openclip import _encode_text_trimmed

    assert encoder.trim_text_padding
    texts = ["a", "a photo of a cat", "a red dress with long sleeves, " * 3, "word " * 200]  # the last is truncated
    tokens = encoder.tokenizer(texts)
    with torch.inference_mode():
        padded = encoder.model.encode_text(tokens)
        trimmed = _encode_text_trimmed(encoder.model, tokens)
        alone = torch.cat([_encode_text_trimmed(encoder.model, encoder.tokenizer([t])) for t in texts])
    assert float((padded - trimmed).abs().max()) <= 1e-5
    assert float((padded - alone).abs().max()) <= 1e-5
    assert encoder.count_tokens(["a photo of a cat", "word " * 200]) == [7, 77]
    vectors, counts = encoder.embed_texts_counted(texts)  # one tokenisation for both
    np.testing.assert_allclose(vectors, encoder.embed_texts(texts), atol=1e-6)
    assert counts == encoder.count_tokens(texts)


def test_text_padding_kept_for_non_causal_towers(encoder):
    from clipsearch.encoders.openclip import _can_trim_padding

    def fake_clip(**attrs):
        base = {"attn_mask": torch.zeros(2, 2), "text_pool_type": "argmax", "positional_embedding": None}
        return type("CLIP", (), {**base, **attrs})()

    assert _can_trim_padding(fake_clip())
    assert not _can_trim_padding(fake_clip(attn_mask=None))  # bidirectional: padding is read
    assert not _can_trim_padding(fake_clip(text_pool_type="last"))  # pools the last (padding) position
    assert _can_trim_padding(encoder.model)


def test_hf_token_and_image_counts(tiny_hf):
    enc = load_encoder(ModelSpec(model="hf:tiny", weights=tiny_hf, device="cpu"))
    assert enc.image_tokens == (64 // 16) ** 2 + 1
    ids = enc.tokenizer(["ab cd", "x"])["input_ids"]
    assert enc.count_tokens(["ab cd", "x"]) == [len(ids[0]), len(ids[1])]


def test_crops_embed_like_normalised_pixels(encoder):
    images = [sample_photo(n) for n in ("astronaut", "chelsea")]
    crops = np.stack([encoder.preprocess.crop(im) for im in images])
    np.testing.assert_allclose(
        encoder.embed_crops(crops), encoder.embed_pixels(encoder.preprocess.normalize(crops)), atol=1e-6
    )
    np.testing.assert_allclose(encoder.embed_crops(crops), encoder.embed_images(images), atol=1e-6)
    assert encoder.embed_crops(crops[:0]).shape == (0, encoder.dim)
