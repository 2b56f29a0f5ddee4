#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh on the device machine (Python 3.12, x86-64, PyTorch and
# many libraries already there, no package index): what clipsearch needs beyond them, into .whl/
# (ignored by git through .git/info/exclude; carry it with the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
# Ray (over 60 MB) does not fit the 64 MB a call may carry: the --gpus-per-actor test skips
# itself where Ray is missing.
for pkg in open_clip_torch ftfy faiss-cpu simplejpeg pillow-heif rawpy watchfiles fastapi starlette uvicorn \
           httptools python-multipart orjson fastapi-offline pydantic pydantic-core annotated-types \
           typing-inspection imagecodecs aiohttp; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl "$pkg" || echo "no wheel for $pkg" >&2
done
du -sh .whl
