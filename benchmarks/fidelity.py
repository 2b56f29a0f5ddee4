"""How close clipsearch's vectors stay to the reference, on real photos and a checkpoint whose
photos map far apart (so that a bound means something).

Prints, side by side in one run:
- the spread of mutual cosines between different photos (the scale every other figure is read on);
- the fast (reduced-scale JPEG) decode against open_clip's own preprocessing on a full decode,
  with the geometry computed from the reduced image's rounded size (before) and from the original
  size with ``box=`` (now), and ``--decode exact``;
- ONNX int8 against fp32: image and text cosines, the old quantised text tower beside today's fp32
  one, how much an image's vector depends on its batch (before: one run per batch; now: one run
  per image), and the top-10 overlap of text→image and image→image searches.

    python benchmarks/fidelity.py            # 300 photos of ../shared/data/imagenet-sample
    python benchmarks/fidelity.py -n 100 --checkpoint stock

``--checkpoint sensitive`` (default): ViT-B-32 with random weights whose class and position
embeddings are scaled by 0.05, so that the picture, not the constant tokens, decides the vector
(mutual cosine median ~0.6 instead of ~0.75). ``stock``: open_clip's random init.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, pct, photos, print_table

TEXTS = [
    "a photo of a dog",
    "a photo of a cat",
    "a red sports car on a road",
    "a bowl of soup",
    "a bird sitting on a branch",
    "a close-up photo of a fish",
    "a sailing boat on the sea",
    "a mountain covered in snow",
    "an old wooden chair",
    "a person playing a guitar",
    "東京の夜景",
    "바닷가의 강아지",
    "a diagram of a bicycle with two wheels and a bell",
    "",
    "word " * 90,
]


def checkpoint(kind: str) -> Path:
    path = CACHE / f"ViT-B-32-{kind}.pt"
    if path.is_file():
        return path
    import torch

    from clipsearch._compat import import_open_clip

    open_clip = import_open_clip()
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    if kind == "sensitive":
        with torch.no_grad():
            model.visual.class_embedding.mul_(0.05)
            model.visual.positional_embedding.mul_(0.05)
            model.token_embedding.weight.normal_(0, 0.1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return path


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1)


def mutual(v: np.ndarray) -> np.ndarray:
    c = v @ v.T
    return c[~np.eye(len(c), dtype=bool)]


def overlap(ref: np.ndarray, other: np.ndarray, queries_ref: np.ndarray, queries_other: np.ndarray, k=10) -> float:
    top_ref = np.argsort(-(queries_ref @ ref.T), axis=1)[:, :k]
    top_other = np.argsort(-(queries_other @ other.T), axis=1)[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_other, strict=True)]))


def row(name: str, c: np.ndarray, bound: float) -> list[object]:
    c = np.asarray(c, dtype=np.float64)
    return [name, f"{c.min():.5f}", f"{pct(list(c), 5):.5f}", f"{np.median(c):.5f}", f"{(c < bound).sum()}/{len(c)}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=300, help="photos")
    parser.add_argument("--checkpoint", choices=["sensitive", "stock"], default="sensitive")
    args = parser.parse_args()
    os.environ.setdefault("CLIPSEARCH_ONNX_CACHE", str(CACHE / "onnx"))

    from PIL import Image

    from clipsearch._compat import import_open_clip
    from clipsearch.decode_stage import DecodeSettings, decode_crop
    from clipsearch.encoders import ModelSpec, load_encoder
    from clipsearch.encoders.onnx import _quantize
    from clipsearch.imaging import decode_image, resize_and_crop, to_rgb

    import_open_clip()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    files = photos(args.n)
    weights = checkpoint(args.checkpoint)
    started = time.perf_counter()
    torch_enc = load_encoder(ModelSpec(model="ViT-B-32", pretrained="", weights=weights, device="cpu"))
    spec = torch_enc.preprocess_spec
    reference_tf = image_transform_v2(
        PreprocessCfg(size=spec.size, mean=spec.mean, std=spec.std, interpolation=spec.interpolation),
        is_train=False,
    )

    def embed(pixels: list) -> np.ndarray:
        return np.concatenate([torch_enc.embed_pixels(np.stack(pixels[i : i + 32])) for i in range(0, len(pixels), 32)])

    datas = [f.read_bytes() for f in files]
    reference = embed([reference_tf(Image.open(io.BytesIO(d)).convert("RGB")).numpy() for d in datas])
    fast, old_fast, exact_crops = [], [], []
    for d in datas:
        decoded, crop = decode_crop(d, DecodeSettings(spec, decode="fast"))
        fast.append(crop)
        old_fast.append(np.asarray(resize_and_crop(to_rgb(decoded.image), spec)))  # the old geometry
        exact_crops.append(decode_crop(d, DecodeSettings(spec, decode="exact"))[1])
    norm = torch_enc.preprocess.normalize
    fast_v = embed(list(norm(np.stack(fast))))
    old_v = embed(list(norm(np.stack(old_fast))))
    exact_v = embed(list(norm(np.stack(exact_crops))))
    reduced = sum(decode_image(d, draft_size=spec.draft_size).box is not None for d in datas)
    spread = mutual(reference)
    text_ref = torch_enc.embed_texts(TEXTS)

    print(
        f"\nViT-B-32, {args.checkpoint} random checkpoint, {len(files)} photos ({reduced} decoded at reduced "
        f"scale); mutual cosine of different photos: median {np.median(spread):.3f}, 5th pct "
        f"{pct(list(spread), 5):.3f}, max {spread.max():.3f}; of the texts: median "
        f"{np.median(mutual(text_ref)):.3f}, max {mutual(text_ref).max():.3f}"
    )
    headers = ["vs open_clip's reference (full decode)", "min", "5th pct", "median", "below bound"]
    print_table(
        "Decode (cosine to open_clip's own preprocessing; bound 0.995)",
        headers,
        [
            row("fast, geometry from the reduced size (before)", cosines(old_v, reference), 0.995),
            row("fast, geometry from the original + box (now)", cosines(fast_v, reference), 0.995),
            row("--decode exact", cosines(exact_v, reference), 0.99999),
        ],
    )

    fp32 = load_encoder(ModelSpec(model="ViT-B-32", pretrained="", weights=weights, runtime="onnx", device="cpu"))
    int8 = load_encoder(
        ModelSpec(model="ViT-B-32", pretrained="", weights=weights, runtime="onnx", precision="int8", device="cpu")
    )
    crops = np.stack(fast)
    fp32_img = np.concatenate([fp32.embed_crops(crops[i : i + 32]) for i in range(0, len(crops), 32)])
    int8_img = np.concatenate([int8.embed_crops(crops[i : i + 32]) for i in range(0, len(crops), 32)])
    # before: one ONNX Runtime run per batch of 32, activation scales shared by the batch
    session = int8._session("image")
    pixels = norm(crops)

    def batched(lo: int, hi: int) -> np.ndarray:
        out = session.run(None, {"clipsearch_input": np.ascontiguousarray(pixels[lo:hi])})[0]
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    int8_batched = np.concatenate([batched(i, min(i + 32, len(pixels))) for i in range(0, len(pixels), 32)])
    int8_alone = np.concatenate([batched(i, i + 1) for i in range(len(pixels))])
    now_alone = np.concatenate([int8.embed_crops(crops[i : i + 1]) for i in range(len(crops))])
    text_fp32 = fp32.embed_texts(TEXTS)
    text_int8 = int8.embed_texts(TEXTS)
    # text → image searches: the photos' own classes (ImageNet file names carry them)
    classes = sorted({f.stem.split("_", 1)[-1].replace("_", " ") for f in files})
    prompts = [f"a photo of a {c}" for c in classes]
    prompts_fp32 = fp32.embed_texts(prompts)
    prompts_int8 = int8.embed_texts(prompts)
    with tempfile.TemporaryDirectory() as tmp:
        import onnxruntime as ort

        # before: the text tower quantised like the image tower
        _quantize(fp32.folder / "text.onnx", Path(tmp) / "text.int8.onnx")
        old_session = ort.InferenceSession(str(Path(tmp) / "text.int8.onnx"), providers=["CPUExecutionProvider"])

        def old_text_tower(texts: list[str]) -> np.ndarray:
            out = old_session.run(None, {"clipsearch_input": fp32._trimmed(fp32.tokenize(texts))})[0]
            return out / np.linalg.norm(out, axis=1, keepdims=True)

        old_text = old_text_tower(TEXTS)
        prompts_old = old_text_tower(prompts)
    print_table(
        "ONNX int8 vs fp32 (cosine; bound 0.999, batch independence 1 - 1e-6)",
        ["compared", *headers[1:]],
        [
            row("image, int8 vs fp32", cosines(int8_img, fp32_img), 0.999),
            row(
                "image in a batch of 32 vs alone, before (one run per batch)",
                cosines(int8_batched, int8_alone),
                1 - 1e-6,
            ),
            row(
                "image in a batch of 32 vs alone, now (one run per image)",
                cosines(int8_img, now_alone),
                1 - 1e-6,
            ),
            row("text, int8 tower (before)", cosines(old_text, text_fp32), 0.999),
            row("text, under --precision int8 now (fp32 tower)", cosines(text_int8, text_fp32), 0.999),
        ],
    )
    queries = fp32_img[: min(50, len(fp32_img))]
    print_table(
        "Top-10 overlap of int8 with fp32 searches",
        ["search", "before", "now"],
        [
            [
                f"text → image ({len(prompts)} class prompts)",
                f"{overlap(fp32_img, int8_batched, prompts_fp32, prompts_old):.3f}",
                f"{overlap(fp32_img, int8_img, prompts_fp32, prompts_int8):.3f}",
            ],
            [
                f"image → image ({len(queries)} queries)",
                f"{overlap(fp32_img, int8_batched, queries, int8_alone[: len(queries)]):.3f}",
                f"{overlap(fp32_img, int8_img, queries, int8_img[: len(queries)]):.3f}",
            ],
        ],
    )
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
