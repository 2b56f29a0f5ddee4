#!/usr/bin/env bash
# What benchmarks/gpu_check.sh needs on the device machine (Python 3.12, x86-64, PyTorch,
# transformers and many libraries already there, no package index, no ../shared), made here:
#
# - .whl/: the wheels clipsearch needs beyond what that machine holds, at the versions this
#   checkout's CI installs (a newer FastAPI beside an older Starlette would not import);
# - .gpu-data/imagenet-sample/: real photos for the benchmarks (CLIPSEARCH_BENCH_DATA there),
#   since ../shared does not travel.
#
# Both are ignored by git (.git/info/exclude); name them in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
for d in /.whl/ /.gpu-data/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude; done
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
# Ray (over 60 MB) and FAISS (30 MB) do not fit the 64 MB a call may carry beside the photos:
# the --gpus-per-actor test skips itself where Ray is missing, and nothing here builds an index.
# typer, typing-extensions, anyio and timm are carried although the machine has them: ours is
# held below 0.29 (pyproject.toml), and the others' versions there are not known to be as new as
# pydantic, FastAPI and open_clip ask for.
rm -rf .whl
for pkg in open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 simplejpeg==1.9.0 pi-heif==1.4.0 rawpy==0.28.0 \
           watchfiles==1.3.0 typer==0.28.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 httptools==0.9.0 \
           python-multipart==0.0.34 orjson==3.13.0 fastapi-offline==1.7.7 pydantic==2.14.4 pydantic-core==2.50.5 \
           annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7 opentelemetry-api==1.45.2 \
           typing-extensions==4.16.0 anyio==4.16.0 timm==1.0.31; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl "$pkg"
done
photos="${CLIPSEARCH_BENCH_DATA:-../shared/data}/imagenet-sample"
rm -rf .gpu-data && mkdir -p .gpu-data/imagenet-sample
# 300 photos (~32 MB): the check's --count, so no photo is ingested twice
mapfile -t files < <(find "$photos" -name '*.JPEG' | sort)
cp -t .gpu-data/imagenet-sample "${files[@]:0:300}"
du -sh .whl .gpu-data
