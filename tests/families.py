"""Tiny checkpoints of every model family the README names, with tokenizers built here (the hub
cannot be reached): SigLIP (a SentencePiece unigram tokenizer, as google/siglip-* ship),
SigLIP 2 (fixed resolution: a SigLIP model with a Gemma byte-fallback BPE tokenizer, as
google/siglip2-*-224 ship; and a NaFlex ``siglip2`` model, which clipsearch refuses), and a
multilingual open_clip CLIP whose text tower is an XLM-RoBERTa (the ``xlm-roberta-base-ViT-B-32``
family) with its SentencePiece tokenizer. Each is saved the way its library saves it and loaded
back through clipsearch's own ``--weights`` path.

Small class and position embeddings make the vectors depend on the picture, so parity tests
against the references mean something."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# words of the three languages the product's specs are written in
CORPUS = [
    "a photo of a red circle",
    "a blue square on a pale background",
    "a green triangle",
    "yellow shapes and colours",
    "빨간 원이 있는 사진",
    "파란 사각형",
    "초록색 삼각형",
    "赤い丸の写真",
    "青い四角",
    "緑の三角形",
]


def _transformers():
    from clipsearch._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import transformers

    return transformers


def _sentencepiece(folder: Path, name: str, vocab_size: int = 160) -> Path:
    import sentencepiece as spm

    corpus = folder / f"{name}-corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / name),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    corpus.unlink()
    return folder / f"{name}.model"


def shrink_positions(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "position_embedding" in name or "class_embedding" in name:
                p.mul_(0.05)
            if "patch_embedding" in name:
                p.normal_(0, 0.05)


def _siglip_config(tf, vocab_size: int, text_length: int):
    return tf.SiglipConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": text_length,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
    )


def _save_siglip(folder: Path, tokenizer, seed: int) -> Path:
    """A tiny SigLIP model for ``tokenizer``, saved with its processor as google/siglip* are."""
    tf = _transformers()
    torch.manual_seed(seed)
    model = tf.SiglipModel(_siglip_config(tf, len(tokenizer), 16))
    shrink_positions(model)
    model.save_pretrained(folder)
    processor = tf.SiglipProcessor(
        image_processor=tf.SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    processor.save_pretrained(folder)
    return folder


def make_tiny_siglip(folder: Path, seed: int = 0) -> Path:
    """google/siglip-* layout: SiglipModel, SiglipTokenizer (SentencePiece), SiglipImageProcessor."""
    tf = _transformers()
    folder.mkdir(parents=True, exist_ok=True)
    spm_model = _sentencepiece(folder, "spiece")
    tokenizer = tf.SiglipTokenizer(str(spm_model), model_max_length=16)
    return _save_siglip(folder, tokenizer, seed)


def make_tiny_siglip2(folder: Path, seed: int = 0) -> Path:
    """google/siglip2-*-224 layout: a SigLIP model with Gemma's byte-fallback BPE tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    tf = _transformers()
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *(f"<0x{i:02X}>" for i in range(256))]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    data = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["merges"]]
    tokenizer = tf.GemmaTokenizer(vocab=data["vocab"], merges=merges, model_max_length=16)
    return _save_siglip(folder, tokenizer, seed)


def make_tiny_siglip2_naflex(folder: Path) -> Path:
    """A NaFlex SigLIP 2 (model_type ``siglip2``: variable resolution, patch inputs)."""
    tf = _transformers()
    folder.mkdir(parents=True, exist_ok=True)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = tf.Siglip2Config(text_config={**small, "vocab_size": 300}, vision_config={**small, "patch_size": 8})
    tf.Siglip2Model(config).save_pretrained(folder)
    return folder


def make_tiny_multilingual_clip(folder: Path, seed: int = 0) -> Path:
    """open_clip's hub layout for a CustomTextCLIP with an XLM-RoBERTa text tower (as
    ``xlm-roberta-base-ViT-B-32``), its tokenizer in the folder (where open_clip's ``local-dir:``
    reads it) and the text model's config in ``text/`` (named by ``hf_model_name``)."""
    import sentencepiece as spm
    from safetensors.torch import save_file

    from clipsearch._compat import import_open_clip

    tf = _transformers()
    open_clip = import_open_clip()
    from open_clip.model import CustomTextCLIP

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "text"
    text.mkdir(exist_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(_sentencepiece(folder, "sentencepiece.bpe")))
    pieces = [
        (sp.id_to_piece(i), sp.get_score(i))
        for i in range(sp.get_piece_size())
        if not sp.is_control(i) and not sp.is_unknown(i)
    ]
    # fairseq's order, as XLM-R has it: <s> <pad> </s> <unk>, the pieces, <mask>
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces, ("<mask>", 0.0)]
    tokenizer = tf.XLMRobertaTokenizer(vocab=vocab)
    tokenizer.save_pretrained(folder)
    tf.XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(text)
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {
            "hf_model_name": str(text),
            "hf_tokenizer_name": str(text),
            "hf_proj_type": "mlp",
            "hf_pooler_type": "mean_pooler",
            "hf_model_pretrained": False,
            "context_length": 77,
        },
    }
    torch.manual_seed(seed)
    model = CustomTextCLIP(**model_cfg)
    with torch.no_grad():
        model.visual.positional_embedding.mul_(0.05)
        model.visual.class_embedding.mul_(0.05)
        model.visual.conv1.weight.normal_(0, 0.05)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    assert open_clip.get_tokenizer(f"local-dir:{folder}") is not None
    return folder
