"""Zero-shot top-1 through `clipsearch eval`, beside the published figure for the model.

Datasets (from ../shared/data when present):
- **imagenet-sample**: one photo per ImageNet-1k class; labelled with OpenAI's curated class
  names (open_clip's IMAGENET_CLASSNAMES, in WNID order). Published (full ImageNet val):
  ViT-B-32/openai 63.3%.
- **cifar10-test**: class subfolders, 1000 per class (``--per-class`` takes the first N of
  each). Published (full test set): ViT-B-32/openai 89.8%.

Prompts: OpenAI's 80 ImageNet templates, averaged (the CLIP paper's protocol; the published
CIFAR-10 figure used 18 CIFAR templates, so expect a point or two of difference there).

    python benchmarks/zero_shot.py [--model ViT-B-32] [--pretrained openai | --weights FILE]
                                   [--per-class 100] [--templates 80] [--runtime onnx] [--precision int8]
                                   [--decode exact]

With real weights (a machine that can reach the Hugging Face hub, or a --weights file) the
first column should land within a few points of the published one on the full sets
(``--per-class 1000``). Here there are no weights: the script says so, uses the random-init
checkpoint of the architecture (benchmarks/_common.py), and prints chance level beside it.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, print_table, random_checkpoint

PUBLISHED = {  # zero-shot top-1, CLIP paper / open_clip's results table
    ("ViT-B-32", "openai"): {"imagenet": 63.3, "cifar10": 89.8},
    ("ViT-B-16", "openai"): {"imagenet": 68.3, "cifar10": 90.8},
    ("ViT-L-14", "openai"): {"imagenet": 75.5, "cifar10": 95.6},
    ("ViT-B-32", "laion2b_s34b_b79k"): {"imagenet": 66.6, "cifar10": 93.7},
}


def imagenet_list(folder: Path, out: Path) -> Path:
    from clipsearch._compat import import_open_clip

    names = import_open_clip().zero_shot_metadata.IMAGENET_CLASSNAMES
    files = sorted(folder.glob("*.JPEG"))
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        for index, path in enumerate(files):
            writer.writerow([str(path), names[index].replace(" ", "_")])
    return out


def cifar_list(folder: Path, per_class: int, out: Path) -> Path:
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            for path in sorted(sub.iterdir())[:per_class]:
                writer.writerow([str(path), sub.name])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--per-class", type=int, default=100, help="CIFAR-10 images per class (1000: the full set)")
    ap.add_argument("--runtime", default=None)
    ap.add_argument("--precision", default=None)
    ap.add_argument("--decode", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--templates",
        type=int,
        default=80,
        help="use the first N of the 80 templates (1000 classes x 80 = 80,000 prompts: minutes on a CPU)",
    )
    args = ap.parse_args()

    import clipsearch
    from clipsearch import evaluate
    from clipsearch.errors import MissingWeightsError
    from clipsearch.evaluate import openai_imagenet_templates

    weights, pretrained, random = args.weights, args.pretrained, False
    if weights is None and pretrained is None:
        pretrained = "openai"
    rows = []
    with tempfile.TemporaryDirectory() as work:
        sets = []
        if (SHARED / "imagenet-sample").is_dir():
            sets.append(("imagenet", imagenet_list(SHARED / "imagenet-sample", Path(work) / "imagenet.csv"), 1000))
        if (SHARED / "cifar10-test").is_dir():
            sets.append(("cifar10", cifar_list(SHARED / "cifar10-test", args.per_class, Path(work) / "c.csv"), 10))
        if not sets:
            sys.exit(f"no datasets under {SHARED}: nothing to measure")
        published = PUBLISHED.get((args.model, pretrained or ""), {})
        for name, listing, classes in sets:

            def run(weights: str | None, pretrained: str | None, db: str, listing: Path = listing):
                with clipsearch.open(
                    Path(work) / db,
                    model=args.model,
                    pretrained=pretrained,
                    weights=weights,
                    device=args.device,
                    runtime=args.runtime,
                    precision=args.precision,
                    decode=args.decode,
                ) as col:
                    templates = openai_imagenet_templates()[: args.templates]
                    return evaluate.zero_shot(col, f"image-list:{listing}", templates=templates)

            try:
                report = run(weights, pretrained, f"{name}.db")
            except MissingWeightsError:
                weights, pretrained, random = str(random_checkpoint(args.model)), None, True
                print(
                    f"no pretrained weights for {args.model} here: using random weights of the architecture "
                    "(the scores below are chance level, not the model's)",
                    flush=True,
                )
                report = run(weights, pretrained, f"{name}-random.db")
            rows.append(
                [
                    name,
                    str(report.n),
                    str(classes),
                    f"{report.top1:.1%}",
                    f"{report.top5:.1%}",
                    f"{published[name]:.1f}%" if name in published and not random else "-",
                    f"{1 / classes:.1%}",
                    f"{report.images_per_second:.0f}",
                ]
            )
            print(f"{name}: top-1 {report.top1:.1%} over {report.n} images", flush=True)
    label = f"{args.model} " + ("(random weights)" if random else f"({pretrained or weights})")
    print_table(
        f"zero-shot: {label}, {args.templates} of OpenAI's 80 templates, {os.cpu_count()} CPUs",
        ["dataset", "images", "classes", "top-1", "top-5", "published top-1", "chance", "images/s"],
        rows,
    )


if __name__ == "__main__":
    main()
