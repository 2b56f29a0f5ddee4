"""A tiny CLIP that the test suite trains, so that search quality is testable.

Random weights put every photo at cosine ~0.99 of every other: a ranking means nothing, and a bug
in tokenisation, the text padding cut, pooling, normalisation or preprocessing that keeps the
shapes right would pass. This model learns, in well under a minute on two cores, to match
pictures of coloured shapes on varied backgrounds to captions ("a photo of a red circle"): a
real open_clip architecture (a ViT with 8-pixel patches on 32-pixel images, a 2-layer text
transformer with CLIP's own tokenizer and 77-token context), trained with open_clip's own
preprocessing and tokenizer, and saved in the hub layout that ``--weights`` loads. The tests
then go through clipsearch's own code only.

Trained once and kept under ``$CLIPSEARCH_TEST_CACHE`` (default ``~/.cache/clipsearch-tests``),
in a folder named by a digest of this file: changing the recipe trains anew.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (215, 35, 35),
    "green": (35, 165, 50),
    "blue": (40, 70, 215),
    "yellow": (235, 205, 30),
}
CLASSES = [f"{color} {shape}" for color in COLORS for shape in SHAPES]  # 12: chance is 1/12
TRAIN_TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of the {}.", "{}", "a drawing of a {}.")
CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 96, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
STEPS = 300
BATCH = 96
SEED = 0


def draw(label: str, rng: np.random.Generator, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A ``"red circle"`` on a random pale background with noise, placed and sized at random
    within the centre square (what a centre crop keeps)."""
    color, shape = label.split()
    w, h = size
    bg = tuple(int(v) for v in rng.integers(150, 256, 3))
    noise = rng.normal(0, 12, (h, w, 3))
    pixels = np.clip(np.array(bg, float)[None, None, :] + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    side = min(w, h)
    x0, y0 = (w - side) // 2, (h - side) // 2
    r = side * rng.uniform(0.22, 0.38)
    cx = x0 + side / 2 + rng.uniform(-0.12, 0.12) * side
    cy = y0 + side / 2 + rng.uniform(-0.12, 0.12) * side
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[color])
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        pen.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    return image


def write_dataset(folder: Path, per_class: int, seed: int, size: tuple[int, int] = (96, 72)) -> Path:
    """``folder/red_circle/000.png``, ...: a zero-shot dataset of the twelve classes."""
    rng = np.random.default_rng(seed)
    for label in CLASSES:
        sub = folder / label.replace(" ", "_")
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(label, rng, size).save(sub / f"{i:03d}.png")
    return folder


def _digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("CLIPSEARCH_TEST_CACHE") or Path.home() / ".cache" / "clipsearch-tests")


def trained_model() -> Path:
    """The trained model's folder (hub layout), trained now if no copy of this recipe is cached."""
    folder = cache_root() / f"trained-clip-{_digest()}"
    if (folder / "open_clip_model.safetensors").is_file():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first: its copy is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def train(folder: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from clipsearch._compat import import_open_clip

    open_clip = import_open_clip()
    from open_clip.model import CLIP

    started = time.perf_counter()
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    preprocess = open_clip.image_transform(CFG["vision_cfg"]["image_size"], is_train=False)
    pool = [(c, draw(CLASSES[c], rng)) for c in rng.integers(0, len(CLASSES), 3000)]
    images = torch.stack([preprocess(img) for _, img in pool])
    image_class = torch.tensor([c for c, _ in pool])
    prompts = [t.format(label) for label in CLASSES for t in TRAIN_TEMPLATES]
    tokens = open_clip.tokenize(prompts)
    prompt_class = torch.tensor([i for i in range(len(CLASSES)) for _ in TRAIN_TEMPLATES])

    model = CLIP(**CFG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=STEPS, pct_start=0.1)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(STEPS):
        pick = torch.randint(0, len(images), (BATCH,), generator=generator)
        # each picture is paired with a caption of its own class, in a random wording
        own = torch.arange(len(prompts)).view(len(CLASSES), -1)[image_class[pick]]  # each image's class's prompts
        texts = own[torch.arange(BATCH), torch.randint(0, own.shape[1], (BATCH,), generator=generator)]
        img = F.normalize(model.encode_image(images[pick]), dim=-1)
        txt = F.normalize(model.encode_text(tokens[texts]), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        # pictures and captions of one class are all positives of each other
        target = (image_class[pick][:, None] == prompt_class[texts][None, :]).float()
        loss = (
            -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
            - (target.T / target.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1).mean()
        ) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    if not torch.isfinite(loss):
        raise RuntimeError(f"training the test model diverged (loss {float(loss)})")
    info = {"steps": STEPS, "final_loss": float(loss.detach()), "seconds": time.perf_counter() - started}
    (folder / "training.json").write_text(json.dumps(info))
    return info
