#!/usr/bin/env bash
# What a stranger gets: the wheel built from this checkout, installed into clean venvs with pip's
# defaults (no local wheel folders, no constraints file), then used.
#   1. the core (no torch): a model folder exported by the dev venv is copied elsewhere, then
#      ingest, text and image search, serve + one /v1/embeddings request; torch must be absent;
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
from tests.conftest import make_tiny_openclip, write_photos
import clipsearch
from clipsearch import models
work = Path(sys.argv[1])
tiny = make_tiny_openclip(work / "tiny-openclip")
models.export(clipsearch.ModelSpec(weights=tiny), work / "exported", int8=False)
shutil.move(work / "exported", work / "model")
write_photos(work / "photos")
PY

if [[ "$what" == core || "$what" == all ]]; then
    start=$SECONDS
    "$PY" -m venv "$work/core"
    "$work/core/bin/pip" install -q "$wheel"
    echo "core install: $((SECONDS - start)) s, $(du -sm "$work/core" | cut -f1) MB"
    "$work/core/bin/python" -c "import importlib.util as u; assert not any(u.find_spec(m) for m in ('torch', 'open_clip', 'transformers')), 'the core pulled torch'"
    cd "$work"
    core/bin/clipsearch ingest photos --db c.db --weights model
    core/bin/clipsearch search "a photo" --db c.db --limit 3
    core/bin/clipsearch search --image "$(ls photos/* | head -1)" --db c.db --limit 1 --json | grep -q '"score": 1.0'
    core/bin/clipsearch serve --db c.db --port 18931 &
    server=$!
    for _ in $(seq 60); do curl -sf http://127.0.0.1:18931/health | grep -q healthy && break; sleep 0.5; done
    curl -sf http://127.0.0.1:18931/v1/embeddings -H 'content-type: application/json' \
        -d '{"input": ["a photo of a cat"]}' | grep -q '"embedding"'
    kill -TERM "$server"
    wait "$server"  # exits 0 after draining
    cd - >/dev/null
    echo "core: ingest, search, serve ok without torch"
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
