"""Helper for `make demo`: write scikit-image's sample photos to a folder, or pick one photo.

python scripts/demo_photos.py DIR          # write the sample photos into DIR
python scripts/demo_photos.py --pick DIR   # print the path of the first image in DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

PHOTOS = [
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
]


def write_samples(folder: Path) -> None:
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        target = folder / f"{name}.jpg"
        if not target.exists():
            Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(target, quality=92)
    print(f"sample photos in {folder}")


def pick(folder: Path) -> None:
    exts = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts):
        print(path)
        return
    sys.exit(f"no image in {folder}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--pick":
        pick(Path(sys.argv[2]))
    elif len(sys.argv) == 2:
        write_samples(Path(sys.argv[1]))
    else:
        sys.exit(__doc__)
