#!/usr/bin/env bash
# What a stranger gets: the wheel built from this checkout, installed into clean venvs with pip's
# defaults (no local wheel folders, no constraints file), then used.
#   1. the core (no torch, no FAISS), installed and started by scripts/container.sh (the Dockerfile's
#      steps): a model folder exported by the dev venv and moved, then ingest, text and image
#      search, eval, watch, and serve answering the official openai client, in processes where an
#      import of torch & co is blocked and recorded (none may be tried);
#   2. the torch extra at the newest torch/torchvision/open_clip the registry offers: export a
#      checkpoint (this imports torchvision: the crash of issue 23 happened here).
# Usage: scripts/install_check.sh [core|torch|all]   (needs `make venv` first)
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
PY="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1

.venv/bin/python -m build --wheel --outdir "$work/dist" . >/dev/null
wheel="$(ls "$work"/dist/clipsearch-*.whl)"
# a tiny random-init checkpoint, written and exported by the dev venv, then moved
.venv/bin/python - "$work" <<'PY'
import shutil, sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.conftest import BLOCKED, BLOCKER, SAMPLE_PHOTOS, make_tiny_openclip, write_photos
import clipsearch
from clipsearch import models
work = Path(sys.argv[1])
tiny = make_tiny_openclip(work / "tiny-openclip")
models.export(clipsearch.ModelSpec(weights=tiny), work / "exported", int8=False)
shutil.move(work / "exported", work / "model")
write_photos(work / "photos")
for name in SAMPLE_PHOTOS[:4]:  # a dataset of class folders for eval
    write_photos(work / "dataset" / name, [name])
(work / "blocker").mkdir()
(work / "blocker" / "sitecustomize.py").write_text(BLOCKER.format(blocked=BLOCKED))
PY

if [[ "$what" == core || "$what" == all ]]; then
    start=$SECONDS
    CLIPSEARCH_VENV="$work/core" CLIPSEARCH_EXTRAS="" sh scripts/container.sh install "$wheel"
    echo "core install: $((SECONDS - start)) s, $(du -sm "$work/core" | cut -f1) MB"
    "$work/core/bin/python" -c "import importlib.util as u; assert not any(u.find_spec(m) for m in ('torch', 'open_clip', 'transformers', 'faiss')), 'the core pulled torch or FAISS'"
    here="$PWD"
    cd "$work"
    export PYTHONPATH="$work/blocker" BLOCK_LOG="$work/blocked.log"
    cs=core/bin/clipsearch
    $cs ingest photos --db c.db --weights model
    $cs search "a photo" --db c.db --limit 3
    $cs search --image "$(ls photos/* | head -1)" --db c.db --limit 1 --json | grep -q '"score": 1.0'
    $cs eval zero-shot dataset --weights model --template "a photo of a {}." --json | grep -q '"top1"'
    mkdir watched
    $cs watch watched --db w.db --weights model >watch.log 2>&1 &
    watcher=$!
    cp "$(ls photos/* | head -1)" watched/
    for _ in $(seq 120); do $cs info --db w.db --json 2>/dev/null | grep -q '"items": 1' && break; sleep 0.5; done
    $cs info --db w.db --json | grep -q '"items": 1' || { cat watch.log; exit 1; }
    kill -TERM "$watcher"
    wait "$watcher" || true
    # serve as the container starts it: the script's defaults, this run's paths
    export CLIPSEARCH_VENV="$work/core" CLIPSEARCH_DB="$work/c.db" CLIPSEARCH_PORT=18931 \
        CLIPSEARCH_WEIGHTS="$work/model" HF_HOME="$work/hf" CLIPSEARCH_ONNX_CACHE="$work/onnx"
    sh "$here/scripts/container.sh" start &
    server=$!
    for _ in $(seq 120); do sh "$here/scripts/container.sh" health 2>/dev/null && break; sleep 0.5; done
    PYTHONPATH= "$here/.venv/bin/python" - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:18931/v1", api_key="unused")
model = client.models.list().data[0].id
assert len(client.embeddings.create(model=model, input=["a photo of a cat"]).data[0].embedding) == 32
PY
    kill -TERM "$server"
    wait "$server"  # exits 0 after draining
    unset CLIPSEARCH_VENV CLIPSEARCH_DB CLIPSEARCH_PORT CLIPSEARCH_WEIGHTS PYTHONPATH BLOCK_LOG
    if [[ -e blocked.log ]]; then echo "tried to import: $(sort -u blocked.log | paste -sd' ')"; exit 1; fi
    cd "$here"
    echo "core: ingest, search, eval, watch, serve + openai ok, torch never imported"
fi

if [[ "$what" == torch || "$what" == all ]]; then
    start=$SECONDS
    "$PY" -m venv "$work/full"
    "$work/full/bin/pip" install -q "$wheel[torch]"
    echo "torch extra install: $((SECONDS - start)) s; $("$work/full/bin/pip" list 2>/dev/null | grep -E '^(torch|torchvision|open_clip_torch) ' | tr -s ' ' | paste -sd, -)"
    "$work/full/bin/clipsearch" models export --weights "$work/tiny-openclip" --out "$work/model-torch" --no-int8
    "$work/full/bin/clipsearch" ingest "$work/photos" --db "$work/t.db" --weights "$work/tiny-openclip"
    "$work/full/bin/clipsearch" search "a photo" --db "$work/t.db" --limit 1
    echo "torch extra: export, ingest, search ok"
fi
